"""Priority without processes: the puller's credit (which band is asked first) and the
queue position a request's status shows."""

from __future__ import annotations

import asyncio
import types

from services.gateway.orchestrator import Orchestrator
from shared.messages import DenoiseParams
from shared.priority_pull import PriorityPuller
from shared.settings import Settings
from shared.workflows.spec import NodeSpec, WorkflowSpec

HIGH, NORMAL = 0, 1  # band indexes, highest first


def test_the_normal_band_is_asked_first_after_fair_every_high_steps() -> None:
    bus = types.SimpleNamespace(settings=Settings())
    puller = PriorityPuller(bus, "encode", "m1", fair_every=3)  # type: ignore[arg-type]
    firsts = []
    for _ in range(8):  # both bands always have work: take from whichever is asked first
        first = puller.order()[0]
        firsts.append(first)
        puller._took(first, 1, [])
    assert firsts == [HIGH, HIGH, HIGH, NORMAL, HIGH, HIGH, HIGH, NORMAL]
    puller._took(HIGH, 5, [])  # a batch of 5 high steps: the normal band is owed at once
    assert puller.order()[0] == NORMAL
    puller._took(HIGH, 1, [NORMAL])  # asked first but empty: owed nothing, back to high first
    assert puller.order() == [HIGH, NORMAL]


def test_queue_position_puts_higher_priority_requests_ahead() -> None:
    async def scenario() -> list[int]:
        workflow = WorkflowSpec(name="w", nodes=[NodeSpec(id="d", kind="denoise", model="m")], output="d.latents")
        params = {"d": DenoiseParams(height=64, width=64, num_inference_steps=2, guidance_scale=1.0, seed=0)}
        gw = Orchestrator(None, None, Settings())  # type: ignore[arg-type]
        served = gw.create("served", workflow, params, priority=0)
        served.denoising.step = 1  # the denoiser is on it
        low = gw.create("low", workflow, params, priority=0)
        high = gw.create("high", workflow, params, priority=9)
        later_low = gw.create("later-low", workflow, params, priority=2)
        return [gw.queue_position(s) for s in (served, low, high, later_low)]

    # served: 0; low: behind served and high; high: behind the one being served only.
    assert asyncio.run(scenario()) == [0, 2, 1, 3]
