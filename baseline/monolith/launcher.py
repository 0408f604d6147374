"""Runs the monolithic baseline on one machine the way `lego.launcher.Mesh` runs the mesh.

Same nats-server, same process handling, same autoscaler; what differs is the plan (one unit
per workflow, `python -m baseline.monolith`), and that there is no gateway: the baseline's
clients (`MonolithClient`) send `pipeline` steps themselves, so the system is ready once every
replica started announces itself.
"""

from __future__ import annotations

import asyncio
import sys
import time

from lego.launcher import Mesh
from lego.units import Unit

MODULE = "baseline.monolith"
SERVICE = "monolith"


def plan_monolith_units(workflows: list[str] | None = None) -> list[Unit]:
    """One unit per workflow (default: the whole catalogue), its whole pipeline: `mono-<workflow>`."""
    from shared.workflows.catalogue import catalogue as full_catalogue

    names = workflows or list(full_catalogue())
    return [Unit(f"mono-{w}", SERVICE, (w,)) for w in names]


class MonolithMesh(Mesh):
    """The baseline's replicas on this machine (`MeshConfig.host`/`port` unused: no gateway)."""

    def plan(self) -> list[Unit]:
        return plan_monolith_units(self.config.workflows)

    def replica_command(self, unit: Unit) -> list[str]:
        return [sys.executable, "-m", MODULE, "--models", ",".join(unit.models)]

    def start_front(self, ready_timeout_s: float) -> None:
        self.wait_replicas(ready_timeout_s)

    def wait_replicas(self, timeout_s: float) -> None:
        """Until every replica started so far announces itself (the gateway-less readiness)."""
        from shared.bus import Bus
        from shared.presence import live_replicas

        async def count() -> int:
            bus = Bus(self.settings(), name="launcher")
            await bus.connect()
            try:
                return len({r.replica_id for r in await live_replicas(bus)})
            finally:
                await bus.close()

        give_up = time.monotonic() + timeout_s
        while time.monotonic() < give_up:
            dead = [c.name for c in self.children if not c.alive()]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited during start; see {self.config.log_dir}")
            if asyncio.run(count()) >= len(self.children):
                self._say("ready: every replica announced itself")
                return
            time.sleep(0.5)
        raise TimeoutError(f"replicas not ready within {timeout_s:.0f}s")
