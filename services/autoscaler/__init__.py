"""The autoscaler: each unit (a process kind hosting some models) scales on its own backlog.

Reads JetStream consumer backlogs and arrival rates and the replicas' heartbeats, decides
replicas per unit against the latency SLO (`policy`), and acts through an actuator: local
processes (inside `lego up`), Kubernetes Deployments, or docker compose services. No torch.
"""
