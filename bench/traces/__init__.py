"""Request traces for cluster-scale benchmarks (issue 15).

- `record`: the record (`TraceRequest`: the Katz trace's fields) and its JSONL files.
- `generate`: production-shaped traces from `TraceParams` and a seed (streaming, numpy chunks).
- `katz`: the published Katz/SwiftDiffusion trace's own file, loaded for replay.
- `workflows`: `workflow_of`, the one rule from a request to our catalogue's workflow.
- `stats`: the figures that say whether a trace is production-shaped.
- `python -m bench.traces --help`: generate / stats / katz from the command line.
"""
