"""API keys: what a key is (`model`), its secret and hash (`secret`), where every gateway finds
them (`store`, a JetStream KV bucket), what each may do and how fast (`limits`), and the route
dependency that checks them (`auth`)."""
