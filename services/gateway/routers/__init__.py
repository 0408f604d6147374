"""The gateway's routes, one module per job; `create_app` includes them in this order (the
order of the OpenAPI document's paths)."""
