"""The monolithic baseline the mesh is measured and checked against, in a room of its own.

- `baseline.pipelines`: diffusers' own pipelines over the zoo's directories (the oracle the
  tests compare the mesh's images with, bit for bit).
- `baseline.monolith`: the monolithic baseline service (one whole diffusers pipeline per
  replica process), its client, and the launcher that runs it (`bench/burst.py`).

Layers: bench -> baseline -> lego -> services -> shared. Nothing below imports this package,
so the serving code knows nothing of the baseline.
"""
