"""The monolithic baseline: one whole diffusers pipeline per replica process, one workflow each.

It exists to compare against the mesh (bench/burst.py): the same requests, served the way a
monolithic deployment serves them, and scaled by the same autoscaler code at the granularity
of a whole workflow. `python -m baseline.monolith --models <workflows>` runs one replica;
`baseline.monolith.launcher.MonolithMesh` runs a set of them like `lego.launcher.Mesh` runs the
mesh, `baseline.monolith.client.MonolithClient` sends them requests.
"""
