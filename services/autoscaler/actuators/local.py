"""The local actuator: service processes on this machine, started and stopped by the process
pool that owns them (`lego up`'s mesh, `lego.launcher.Mesh`). It runs inside `lego up`, in a
thread beside the loop that restarts crashed children, so one owner holds every process.

Stopping a replica is graceful: SIGTERM to its process group; the service stops fetching,
finishes and acks the step in hand, hands back anything it fetched but did not start, and
exits. The pool does not restart a replica it was told to remove.
"""

from __future__ import annotations

from typing import Protocol

from services.autoscaler.placement import MIN_SHARE


class ProcessPool(Protocol):
    def unit_models(self) -> dict[str, tuple[str, ...]]: ...

    def replica_count(self, unit: str) -> int: ...

    def add_replica(self, unit: str, share: float = ...) -> object: ...

    def remove_replica(self, unit: str) -> object: ...


class LocalActuator:
    name = "local"

    def __init__(self, pool: ProcessPool) -> None:
        self.pool = pool

    def units(self) -> dict[str, tuple[str, ...]]:
        return self.pool.unit_models()

    def current(self, unit: str) -> int:
        return self.pool.replica_count(unit)

    def scale(self, unit: str, replicas: int, share: float = 0.0) -> None:
        """`share`: each new replica's expected compute, which the pool places by over several GPUs."""
        while self.pool.replica_count(unit) < replicas:
            self.pool.add_replica(unit, share=max(share, MIN_SHARE))
        while self.pool.replica_count(unit) > replicas:
            if self.pool.remove_replica(unit) is None:
                break
