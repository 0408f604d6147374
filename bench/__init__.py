"""Benchmarks, run as scripts (`python bench/overhead.py`). A package so that import-linter
holds it to the top layer (bench -> baseline -> lego -> services -> shared) and so that
`from bench.plots import ...` names one package; each script puts the repository root on
sys.path itself."""
