"""The monolithic baseline: one whole diffusers pipeline per replica process, one workflow each.

It exists to compare against the mesh (bench/burst.py): the same requests, served the way a
monolithic deployment serves them, and scaled by the same autoscaler code at the granularity
of a whole workflow.
"""
