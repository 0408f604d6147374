"""The step worker's delivery rules against a real nats-server, with plain handlers for models."""

from __future__ import annotations

import asyncio
import time

import pytest

from shared.bus import Bus
from shared.messages import StepKind, StepRequest, StepResult
from shared.settings import Settings
from shared.subjects import result_subject
from shared.worker import BadStepInput, StepWorker

pytestmark = pytest.mark.asyncio(loop_scope="function")


def _step(node: str = "n1", request: str = "r1") -> StepRequest:
    return StepRequest(
        request_id=request,
        node_id=node,
        kind=StepKind.ENCODE,
        model_id="m1",
        reply_to=result_subject("gw"),
        deadline=time.time() + 60,
    )


def _ok(step: StepRequest) -> StepResult:
    return StepResult(request_id=step.request_id, node_id=step.node_id, ok=True)


class Harness:
    """One bus, one worker on (encode, m1) with the given handler, and the results it publishes."""

    def __init__(self, url: str, handler, **settings) -> None:
        self.settings = Settings.from_env(nats_url=url, ack_wait_s=1.0, max_deliver=2, **settings)
        self.bus = Bus(self.settings, "test")
        self.handler = handler
        self.results: list[StepResult] = []
        self.stop = asyncio.Event()

    async def __aenter__(self) -> Harness:
        await self.bus.connect()
        await self.bus.ensure_streams()

        async def collect(result: StepResult) -> None:
            self.results.append(result)

        await self.bus.subscribe_results("gw", collect)
        worker = StepWorker(self.bus, StepKind.ENCODE, "m1", self.handler, "replica-1")
        self.task = asyncio.create_task(worker.run(self.stop))
        return self

    async def wait_results(self, count: int, timeout: float = 30) -> list[StepResult]:
        give_up = time.monotonic() + timeout
        while len(self.results) < count:
            assert time.monotonic() < give_up, f"only {len(self.results)} results"
            await asyncio.sleep(0.05)
        return self.results

    async def backlog(self) -> int:
        pending, ack_pending = await self.bus.consumer_backlog(StepKind.ENCODE, "m1")
        return pending + ack_pending

    async def __aexit__(self, *exc) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)
        await self.bus.close()


async def test_bad_input_is_terminated_with_an_error_result(nats_server):
    calls = []

    async def handler(step):
        calls.append(step.node_id)
        raise BadStepInput("prompt must be a string")

    async with Harness(nats_server, handler) as h:
        await h.bus.publish_step(_step())
        [result] = await h.wait_results(1)
        assert not result.ok and result.error.code == "bad_step_input"
        assert "prompt must be a string" in result.error.message
        assert await h.backlog() == 0
    assert calls == ["n1"], "a terminated step must not be retried"


async def test_transient_fault_is_retried_and_answered_once(nats_server):
    calls = []

    async def handler(step):
        calls.append(step.node_id)
        if len(calls) == 1:
            raise RuntimeError("device busy")
        return _ok(step)

    async with Harness(nats_server, handler) as h:
        await h.bus.publish_step(_step())
        [result] = await h.wait_results(1)
        assert result.ok
    assert len(calls) == 2


async def test_fault_on_every_attempt_becomes_an_error_after_max_deliver(nats_server):
    async def handler(step):
        raise RuntimeError("always broken")

    async with Harness(nats_server, handler) as h:
        await h.bus.publish_step(_step())
        [result] = await h.wait_results(1)
        assert not result.ok and result.error.code == "step_failed"
        assert "always broken" in result.error.message
        assert await h.backlog() == 0


async def test_long_step_is_kept_alive_not_redelivered(nats_server):
    calls = []

    async def handler(step):
        calls.append(step.node_id)
        await asyncio.sleep(3.5)  # well past AckWait (1 s): in_progress() must hold the step
        return _ok(step)

    async with Harness(nats_server, handler) as h:
        await h.bus.publish_step(_step())
        [result] = await h.wait_results(1)
        assert result.ok
        assert await h.backlog() == 0
    assert calls == ["n1"]


async def test_expired_step_is_answered_with_deadline_error(nats_server):
    async def handler(step):
        raise AssertionError("an expired step must not run")

    async with Harness(nats_server, handler) as h:
        step = _step()
        step.deadline = time.time() - 1
        await h.bus.publish_step(step)
        [result] = await h.wait_results(1)
        assert result.error.code == "deadline_exceeded"


async def test_gateway_fails_a_request_whose_replicas_all_died(nats_server):
    """A step JetStream gives up on (MaxDeliver reached, never acked) fails the request: no hang."""
    from services.gateway.orchestrator import Orchestrator, RequestFailed
    from shared.tensor_plane import TensorPlane
    from shared.workflows.spec import NodeSpec, WorkflowSpec

    settings = Settings.from_env(nats_url=nats_server, ack_wait_s=1.0, max_deliver=2, gateway_id="gw-test")
    bus = Bus(settings, "gateway")
    await bus.connect()
    await bus.ensure_streams()
    plane = TensorPlane(settings)
    await plane.start()
    orchestrator = Orchestrator(bus, plane, settings)
    await orchestrator.start()
    # A "replica" that takes the step and dies every time: fetches, never acks.
    psub = await bus.pull_subscription(StepKind.ENCODE, "m1")

    async def dying_replica() -> None:
        while True:
            try:
                await psub.fetch(1, timeout=1)
            except TimeoutError:
                pass

    dier = asyncio.create_task(dying_replica())
    spec = WorkflowSpec(name="one", nodes=[NodeSpec(id="a", kind="encode", model="m1")], output="a.x")
    try:
        t0 = time.monotonic()
        with pytest.raises(RequestFailed) as info:
            await orchestrator.run("req-1", spec, {})
        assert info.value.error.code == "step_exhausted"
        assert time.monotonic() - t0 < 30
    finally:
        dier.cancel()
        await bus.close()
        await plane.close()
