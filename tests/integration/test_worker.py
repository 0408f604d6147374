"""The step worker's delivery rules against a real nats-server, with plain handlers for models."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from shared.bus import Bus
from shared.messages import EncodeParams, StepKind, StepRequest, StepResult, VaeDecodeParams
from shared.settings import Settings
from shared.subjects import band_of, result_subject, step_subject
from shared.worker import BadStepInput, StepWorker

pytestmark = pytest.mark.asyncio(loop_scope="function")


def _step(node: str = "n1", request: str = "r1") -> StepRequest:
    return StepRequest(
        request_id=request,
        node_id=node,
        kind=StepKind.ENCODE,
        model_id="m1",
        params={"prompt": "a test"},
        reply_to=result_subject("gw"),
        deadline=time.time() + 60,
    )


def _ok(step: StepRequest) -> StepResult:
    return StepResult(request_id=step.request_id, node_id=step.node_id, ok=True)


class Harness:
    """One bus, one worker on (encode, m1) with the given handler, and the results it publishes."""

    def __init__(self, url: str, handler, concurrency: int = 1, **settings) -> None:
        self.settings = Settings.from_env(nats_url=url, ack_wait_s=1.0, max_deliver=2, **settings)
        self.concurrency = concurrency
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
        worker = StepWorker(self.bus, StepKind.ENCODE, "m1", self.handler, "replica-1", concurrency=self.concurrency)
        self.worker = worker
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

    async def drained(self, timeout: float = 10) -> bool:
        """Whether the consumer's backlog reaches 0: the worker publishes a result before it
        acks (or terms) the step, so the ack may land just after the result is seen."""
        give_up = time.monotonic() + timeout
        while await self.backlog() != 0:
            if time.monotonic() > give_up:
                return False
            await asyncio.sleep(0.05)
        return True

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
        assert await h.drained()
    assert calls == ["n1"], "a terminated step must not be retried"


async def test_a_step_whose_params_do_not_parse_is_answered_not_left_to_its_deadline(nats_server):
    """Params of the wrong type (a prompt that is a number): the worker cannot build the step,
    yet it can read whom to answer, so the sender gets a bad_step_input error naming the field."""
    calls = []

    async def handler(step):
        calls.append(step)
        return _ok(step)

    async with Harness(nats_server, handler) as h:
        body = json.loads(_step(node="bad").model_dump_json())
        body["params"]["prompt"] = 42
        await h.bus.js.publish(step_subject(StepKind.ENCODE, "m1"), json.dumps(body).encode())
        (result,) = await h.wait_results(1)
        assert not result.ok and result.error.code == "bad_step_input"
        assert "prompt" in result.error.message and "string" in result.error.message, result.error.message
        assert calls == [] and await h.drained()


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
        assert await h.drained()


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
        assert await h.drained()
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


@pytest.mark.parametrize("priority", [0, 9])
async def test_gateway_fails_a_request_whose_replicas_all_died(nats_server, priority):
    """A step JetStream gives up on (MaxDeliver reached, never acked) fails the request: no hang,
    whichever priority band the step queued in."""
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
    psub = await bus.pull_subscription(StepKind.ENCODE, "m1", band_of(priority))

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
            params = {"a": EncodeParams(prompt="a cat")}
            await orchestrator.execute(orchestrator.create("req-1", spec, params, priority=priority))
        assert info.value.error.code == "step_exhausted"
        assert time.monotonic() - t0 < 30
    finally:
        dier.cancel()
        await psub.unsubscribe()
        await bus.close()
        await plane.close()


@contextlib.asynccontextmanager
async def _two_node_mesh(nats_server: str, loses: dict[str, Callable[[int], bool]]):
    """A producer (`a`, encode) and a consumer (`b`, vae_decode: the images) as real workers,
    and a gateway orchestrator; `loses[node](attempt)` says whether that node's replica "dies"
    with what it holds right after answering that attempt. Yields (orchestrator, spec, params,
    calls): `calls` lists (node, attempt) as they ran."""
    import torch

    from services.gateway.orchestrator import Orchestrator
    from shared.step_handler import ModelStepHandler
    from shared.tensor_plane import TensorPlane
    from shared.workflows.spec import NodeSpec, WorkflowSpec

    settings = Settings.from_env(nats_url=nats_server, ack_wait_s=2.0, max_deliver=3, gateway_id="gw-replan")
    calls: list[tuple[str, int]] = []

    class Produce:
        kinds, model_id, node = (StepKind.ENCODE,), "producer", "a"

        def run(self, step, inputs, ctx):
            calls.append(("a", step.attempt))
            return {"x": torch.arange(50_000, dtype=torch.float32)}  # 200 KB: not inline

    class Consume:
        kinds, model_id, node = (StepKind.VAE_DECODE,), "consumer", "b"

        def run(self, step, inputs, ctx):
            calls.append(("b", step.attempt))
            # 150 KB of images (not inline: held by this replica until the gateway pulls them)
            return {"images": (inputs["x"] % 256).to(torch.uint8).repeat(3)[: 3 * 50_000].reshape(1, 250, 200, 3)}

    buses, planes, tasks = [], [], []
    stop = asyncio.Event()
    compute = ThreadPoolExecutor(1)
    for runner in (Produce(), Consume()):
        bus, plane = Bus(settings, runner.model_id), TensorPlane(settings)
        await bus.connect()
        await bus.ensure_streams()
        await plane.start()
        handler = ModelStepHandler(runner, plane, bus, compute, runner.model_id)

        async def answer_then_maybe_die(step, handler=handler, plane=plane, lose=loses.get(runner.node)):
            result = await handler(step)
            if lose is not None and lose(step.attempt):
                plane.release(step.request_id)  # the replica "dies" with what it held
            return result

        worker = StepWorker(bus, runner.kinds[0], runner.model_id, answer_then_maybe_die, runner.model_id)
        tasks.append(asyncio.create_task(worker.run(stop)))
        buses.append(bus)
        planes.append(plane)

    gw_bus, gw_plane = Bus(settings, "gateway"), TensorPlane(settings)
    await gw_bus.connect()
    await gw_plane.start()
    orchestrator = Orchestrator(gw_bus, gw_plane, settings)
    await orchestrator.start()
    spec = WorkflowSpec(
        name="two",
        nodes=[
            NodeSpec(id="a", kind="encode", model="producer"),
            NodeSpec(id="b", kind="vae_decode", model="consumer", inputs={"x": "a.x"}),
        ],
        output="b.images",
    )
    params = {"a": EncodeParams(prompt="a cat"), "b": VaeDecodeParams()}
    try:
        yield orchestrator, spec, params, calls
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for bus in [*buses, gw_bus]:
            await bus.close()
        for plane in [*planes, gw_plane]:
            await plane.close()
        compute.shutdown()


async def test_lost_inputs_make_the_gateway_rerun_their_producer(nats_server):
    """A producer's tensors vanish before the consumer reads them (as when its replica dies):
    the consumer reports input_lost, the gateway re-runs producer and consumer, and the request
    completes with the right output."""
    async with _two_node_mesh(nats_server, {"a": lambda attempt: attempt == 1}) as (orchestrator, spec, params, calls):
        images = await asyncio.wait_for(orchestrator.execute(orchestrator.create("req-replan", spec, params)), 60)
        assert images.to_numpy().reshape(-1)[:12].tolist() == list(range(12))
        assert calls == [("a", 1), ("a", 2), ("b", 2)]
        assert orchestrator.get("req-replan").nodes.attempts == {"a": 2, "b": 2}


async def test_images_lost_on_every_rerun_fail_the_request_not_leave_it_succeeded(nats_server):
    """The replica holding the images dies each time before the gateway pulls them: the output
    node re-runs up to the re-plan bound, then the request fails with output_unavailable, and
    its record (what GET /v1/requests shows, and the metrics count) says failed."""
    from services.gateway.orchestrator import MAX_REPLANS, RequestFailed
    from services.gateway.request_state import RunStatus

    async with _two_node_mesh(nats_server, {"b": lambda attempt: True}) as (orchestrator, spec, params, calls):
        with pytest.raises(RequestFailed) as failed:
            await asyncio.wait_for(orchestrator.execute(orchestrator.create("req-lost", spec, params)), 60)
        assert failed.value.error.code == "output_unavailable"
        state = orchestrator.get("req-lost")
        assert state.status is RunStatus.FAILED and state.error.code == "output_unavailable"
        assert [c for c in calls if c[0] == "b"] == [("b", i) for i in range(1, MAX_REPLANS + 2)]


async def test_a_batching_worker_keeps_several_steps_in_hand_and_measures_per_step_cost(nats_server):
    """concurrency=3 (a denoiser batching 3): three steps run at once, a fourth waits for room,
    none is lost, and the per-step cost the autoscaler reads is about a third of a step's time."""
    running, peak = 0, 0

    async def handler(step):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.6)  # three of these side by side, as a batched loop would be
        running -= 1
        return _ok(step)

    async with Harness(nats_server, handler, concurrency=3) as h:
        for i in range(6):
            await h.bus.publish_step(_step(node=f"n{i}"))
        results = await h.wait_results(6)
        assert sorted(r.node_id for r in results) == [f"n{i}" for i in range(6)]
        assert all(r.ok for r in results)
        assert peak == 3
        assert 0.05 < h.worker.seconds_per_item < 0.45, h.worker.seconds_per_item
        assert await h.drained()
