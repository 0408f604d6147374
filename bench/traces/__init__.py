"""Request traces for cluster-scale benchmarks (issue 15): the record format, generators of
production-shaped traces, and loaders for published traces."""
