"""The autoscaler on a real nats-server: it reads consumer backlogs and heartbeats, scales the
unit with the backlog (and only it) through its actuator, shrinks it after the cooldown, and
publishes its status where the gateway reads it. (The whole mesh under `lego up`:
tests/integration/test_autoscaling_mesh.py.)"""

from __future__ import annotations

import asyncio
import time

from services.autoscaler.controller import Autoscaler
from services.autoscaler.placement import MIN_SHARE
from services.autoscaler.policy import Limits, PolicyConfig, Slo
from services.autoscaler.signals import Observer
from shared.bus import Bus
from shared.messages import ReplicaInfo, StepKind, StepRequest
from shared.presence import autoscaler_status, presence_bucket, presence_key
from shared.settings import Settings


class FakeActuator:
    """Counts replicas instead of starting processes."""

    name = "fake"

    def __init__(self, units: dict[str, tuple[str, ...]]) -> None:
        self._units = units
        self.replicas = dict.fromkeys(units, 1)
        self.calls: list[tuple[str, int]] = []
        self.shares: list[float] = []  # the share each scale call passed (placement over GPUs)

    def units(self) -> dict[str, tuple[str, ...]]:
        return dict(self._units)

    def current(self, unit: str) -> int:
        return self.replicas[unit]

    def scale(self, unit: str, replicas: int, share: float = 0.0) -> None:
        self.calls.append((unit, replicas))
        self.shares.append(share)
        self.replicas[unit] = replicas


def _step(i: int) -> StepRequest:
    return StepRequest(
        request_id=f"r{i}",
        node_id="denoise",
        kind=StepKind.DENOISE,
        model_id="sd3-transformer",
        params={"height": 64, "width": 64, "num_inference_steps": 2, "guidance_scale": 5.0, "seed": 0},
        reply_to="lego.result.nobody",
        deadline=time.time() + 600,
    )


async def test_backlog_scales_its_unit_only_then_the_cooldown_brings_it_back(nats_server: str) -> None:
    bus = Bus(Settings.from_env(nats_url=nats_server), name="test-autoscaler")
    await bus.connect()
    try:
        await bus.ensure_streams()
        await bus.ensure_consumer(StepKind.ENCODE, "clip-l")
        psub = await bus.pull_subscription(StepKind.DENOISE, "sd3-transformer")
        # One live denoiser replica has measured 1 s a step; the encoder 10 ms.
        kv = await presence_bucket(bus)
        for kind, model, seconds in ((StepKind.DENOISE, "sd3-transformer", 1.0), (StepKind.ENCODE, "clip-l", 0.01)):
            info = ReplicaInfo(
                replica_id=f"r-{model}", kind=kind, model_id=model, host="h", pid=1, seconds_per_item=seconds
            )
            await kv.put(presence_key(info), info.model_dump_json().encode())
        for i in range(12):
            await bus.publish_step(_step(i))

        actuator = FakeActuator({"encoder": ("clip-l",), "sd3-transformer": ("sd3-transformer",)})
        config = PolicyConfig(slo=Slo(factor=5.0), utilisation=0.7, cooldown_s=1.0, default_limits=Limits(1, 3))
        autoscaler = Autoscaler(Observer.for_policy(bus, config, window_s=2.0), actuator, config)
        tick = await autoscaler.tick()
        # 12 steps x 1 s to drain in (5 - 1) x 1 s -> 3 replicas; the encoder has nothing queued.
        assert actuator.replicas == {"encoder": 1, "sd3-transformer": 3}
        [decision] = tick.decisions
        assert decision.unit == "sd3-transformer" and (decision.from_replicas, decision.to_replicas) == (1, 3)
        assert "backlog 12" in decision.reason

        status = await autoscaler_status(bus)
        assert status is not None and status.actuator == "fake" and status.slo == "5x solo latency"
        units = {u.unit: u for u in status.units}
        assert units["sd3-transformer"].backlog == 12 and units["sd3-transformer"].replicas == 3
        assert units["sd3-transformer"].seconds_per_item == 1.0 and units["encoder"].backlog == 0

        # The work is done (acked): after a cooldown of wanting 1, down to 1 (the window's peak).
        for msg in await psub.fetch(12, timeout=5):
            await msg.ack_sync()  # the server counts every ack before the next tick reads the backlog
        give_up = time.monotonic() + 20
        while actuator.replicas["sd3-transformer"] > 1 and time.monotonic() < give_up:
            await autoscaler.tick()
            await asyncio.sleep(0.2)
        assert actuator.replicas == {"encoder": 1, "sd3-transformer": 1}
        assert [c for c in actuator.calls if c[0] == "sd3-transformer"] == [
            ("sd3-transformer", 3),
            ("sd3-transformer", 1),
        ]
        assert not [c for c in actuator.calls if c[0] == "encoder"]
    finally:
        await bus.close()


async def test_requests_admitted_by_a_gateway_scale_the_denoiser_before_its_steps_arrive(nats_server: str) -> None:
    """Requests just admitted are still at their text encoders, yet the denoiser (2 s a step)
    scales for them now: the gateway announces each admission with the steps it will publish."""
    from services.gateway.running import announce
    from shared.workflows.catalogue import catalogue

    settings = Settings.from_env(nats_url=nats_server)
    bus, gateway = Bus(settings, name="test-autoscaler"), Bus(settings, name="test-gateway")
    await bus.connect()
    await gateway.connect()
    try:
        await bus.ensure_streams()
        await bus.ensure_consumer(StepKind.ENCODE, "clip-l")
        await bus.ensure_consumer(StepKind.DENOISE, "sd3-transformer")
        kv = await presence_bucket(bus)
        info = ReplicaInfo(
            replica_id="r-den", kind=StepKind.DENOISE, model_id="sd3-transformer", host="h", pid=1, seconds_per_item=2.0
        )
        await kv.put(presence_key(info), info.model_dump_json().encode())
        actuator = FakeActuator({"encoder": ("clip-l",), "sd3-transformer": ("sd3-transformer",)})
        config = PolicyConfig(slo=Slo(factor=5.0), utilisation=0.5, cooldown_s=30.0, default_limits=Limits(1, 8))
        observer = Observer.for_policy(bus, config, window_s=10.0)
        await observer.listen()
        autoscaler = Autoscaler(observer, actuator, config)
        await autoscaler.tick()  # the rate windows start here
        assert actuator.replicas["sd3-transformer"] == 1
        for _ in range(6):
            await announce(gateway, catalogue()["sd3"])
        await gateway.nc.flush()
        give_up = time.monotonic() + 30
        while actuator.replicas["sd3-transformer"] == 1 and time.monotonic() < give_up:
            await asyncio.sleep(0.5)  # the rate is over at least half a second: 6 steps -> <= 12/s
            await autoscaler.tick()
        assert actuator.replicas["sd3-transformer"] > 1, "admissions did not scale the denoiser"
        # each new replica is told the compute it will keep busy: the unit's load over its replicas
        shares = [
            sh for (unit, _), sh in zip(actuator.calls, actuator.shares, strict=True) if unit == "sd3-transformer"
        ]
        assert len(shares) == 1 and MIN_SHARE < shares[0] <= 1.0, shares
        status = await autoscaler_status(bus)
        assert status is not None
        assert {u.unit: u.backlog for u in status.units} == {"encoder": 0, "sd3-transformer": 0}  # nothing queued yet
    finally:
        await gateway.close()
        await bus.close()
