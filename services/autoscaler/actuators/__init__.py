"""Actuators: how the autoscaler's decisions become running replicas.

One interface, three ways: `local` (service processes on this machine, the ones `lego up`
started), `kubernetes` (one Deployment per unit, through the official client), `compose`
(containers of a docker compose project, through the Docker Engine API). A unit is whatever
the actuator scales as one: a process kind, a Deployment, a compose service.
"""

from __future__ import annotations

from typing import Protocol

ACTUATORS = ("local", "kubernetes", "compose")


class Actuator(Protocol):
    name: str

    def units(self) -> dict[str, tuple[str, ...]]:
        """Every scalable unit and the model ids its replicas host."""
        ...

    def current(self, unit: str) -> int:
        """Replicas the unit runs now, starting ones included, stopping ones not."""
        ...

    def scale(self, unit: str, replicas: int, share: float = 0.0) -> None:
        """Ask for `replicas`; returns without waiting for them to start or stop. `share`: the
        compute each new replica is expected to keep busy, for an actuator that places replicas
        on devices itself (the local one over `lego up --gpus N`; a cluster's scheduler places
        the others)."""
        ...
