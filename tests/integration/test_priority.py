"""Request priority on the bus: one busy replica serves a high-priority step before earlier
low-priority ones, and low-priority steps still finish under a stream of high-priority work.
A real nats-server, the real worker loop and priority puller, a trivial model function; the
asserts are on the order of completion, never on durations."""

from __future__ import annotations

import asyncio
import time

import pytest

from shared import subjects
from shared.bus import Bus
from shared.messages import StepKind, StepRequest, StepResult
from shared.settings import Settings
from shared.worker import StepWorker

pytestmark = pytest.mark.asyncio(loop_scope="function")

FAIR_EVERY = 3


def _step(node: str, priority: int) -> StepRequest:
    return StepRequest(
        request_id=f"r-{node}",
        node_id=node,
        kind=StepKind.ENCODE,
        model_id="m1",
        params={"prompt": "a test"},
        reply_to=subjects.result_subject("gw"),
        deadline=time.time() + 120,
        priority=priority,
    )


class OneReplica:
    """One replica of (encode, m1) that handles one step at a time, in the order it records.
    Its first step waits on `gate`, so the test can queue work behind a busy replica."""

    def __init__(self, url: str) -> None:
        self.bus = Bus(Settings.from_env(nats_url=url), "test")
        self.order: list[str] = []
        self.first_started = asyncio.Event()
        self.gate = asyncio.Event()
        self.on_step = lambda step: None
        self.stop = asyncio.Event()

    async def handle(self, step: StepRequest) -> StepResult:
        if not self.order:
            self.first_started.set()
            await self.gate.wait()
        self.order.append(step.node_id)
        self.on_step(step)
        return StepResult(request_id=step.request_id, node_id=step.node_id, ok=True)

    async def __aenter__(self) -> OneReplica:
        await self.bus.connect()
        await self.bus.ensure_streams()
        worker = StepWorker(self.bus, StepKind.ENCODE, "m1", self.handle, "replica-1", fair_every=FAIR_EVERY)
        self.task = asyncio.create_task(worker.run(self.stop))
        return self

    async def served(self, count: int, timeout: float = 60) -> list[str]:
        give_up = time.monotonic() + timeout
        while len(self.order) < count:
            assert time.monotonic() < give_up, f"only {self.order} were served"
            await asyncio.sleep(0.05)
        return self.order

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 15)
        await self.bus.close()


async def test_a_high_priority_step_is_served_before_earlier_low_ones(nats_server):
    async with OneReplica(nats_server) as replica:
        await replica.bus.publish_step(_step("low-0", 0))
        await asyncio.wait_for(replica.first_started.wait(), 30)  # the replica is busy with low-0
        for i in range(1, 4):
            await replica.bus.publish_step(_step(f"low-{i}", 0))
        await replica.bus.publish_step(_step("high", 9))
        replica.gate.set()
        order = await replica.served(5)
    # Only the step already in hand goes first; the high one overtakes every queued low one.
    assert order == ["low-0", "high", "low-1", "low-2", "low-3"]


async def test_low_priority_still_finishes_under_a_stream_of_high_priority_work(nats_server):
    """Every high-priority step served brings another: the high band never empties, yet the
    low-priority step is served within FAIR_EVERY + 1 high ones (the puller's credit)."""
    async with OneReplica(nats_server) as replica:
        published = {"high": 0}
        when_low: dict[str, int] = {}  # high steps published (besides high-0) when the low one was served

        def keep_high_coming(step: StepRequest) -> None:
            if step.node_id == "low":
                when_low["published"] = published["high"]
            if published["high"] < 40:
                published["high"] += 1
                asyncio.get_running_loop().create_task(replica.bus.publish_step(_step(f"high-{published['high']}", 9)))

        await replica.bus.publish_step(_step("high-0", 9))
        await asyncio.wait_for(replica.first_started.wait(), 30)
        await replica.bus.publish_step(_step("low", 0))
        for _ in range(3):
            published["high"] += 1
            await replica.bus.publish_step(_step(f"high-{published['high']}", 9))
        replica.on_step = keep_high_coming
        replica.gate.set()
        give_up = time.monotonic() + 60
        while "low" not in replica.order:
            assert time.monotonic() < give_up, f"the low step starved: served {replica.order}"
            await asyncio.sleep(0.05)
        position = replica.order.index("low")
    assert 1 <= position <= FAIR_EVERY + 2, replica.order
    # `position` high steps were served before it, of 1 + when_low["published"] published by then.
    assert when_low["published"] + 1 > position, "no high-priority work was waiting when the low step was served"


async def test_backlog_sums_the_bands_and_admission_counts_only_equal_or_higher(nats_server):
    """Nobody consumes: queued steps of both bands show in the model's backlog (the autoscaler's
    and /v1/status's view), while a high-priority request counts only the high band's."""
    from services.gateway.overload import ModelLoad

    bus = Bus(Settings.from_env(nats_url=nats_server), "test")
    await bus.connect()
    try:
        await bus.ensure_streams()
        for band in subjects.BAND_NAMES:
            await bus.ensure_consumer(StepKind.ENCODE, "m1", band)
        for i in range(3):
            await bus.publish_step(_step(f"low-{i}", 0))
        await bus.publish_step(_step("high", 7))
        # A step acked as stored reaches a consumer's pending count a moment later (a loaded box
        # once saw 3 of the 4 at once): wait for all four, then check every view of them.
        give_up = time.monotonic() + 30
        while True:
            [counters] = [c for c in await bus.step_consumers() if c.model_id == "m1"]
            if counters.backlog == 4 or time.monotonic() > give_up:
                break
            await asyncio.sleep(0.05)
        assert (counters.kind, counters.backlog) == ("encode", 4)
        assert await bus.consumer_backlog(StepKind.ENCODE, "m1") == (4, 0)
        load = ModelLoad(backlog=counters.backlog, replicas=1, seconds_per_item=1.0, bands=counters.bands)
        assert (load.wait_s(0), load.wait_s(9)) == (4.0, 1.0)
    finally:
        await bus.close()


async def test_an_empty_high_band_is_asked_once_not_before_every_step(nats_server, monkeypatch):
    """While nothing is published on the high band, the replica trusts it empty (it listens to
    its subject) instead of asking it before each step: a round trip a step saved. A high step
    published meanwhile is heard and served next."""
    from shared.priority_pull import BandPull

    asked: list[str] = []
    real_now = BandPull.now

    async def counting_now(self: BandPull, batch: int) -> list:
        asked.append(self.band)
        return await real_now(self, batch)

    monkeypatch.setattr(BandPull, "now", counting_now)
    async with OneReplica(nats_server) as replica:
        await replica.bus.publish_step(_step("low-0", 0))
        await asyncio.wait_for(replica.first_started.wait(), 30)
        for i in range(1, 11):
            await replica.bus.publish_step(_step(f"low-{i}", 0))
        replica.gate.set()
        await replica.served(11)
        high_asks = asked.count("high")
        await replica.bus.publish_step(_step("high", 9))
        order = await replica.served(12)
    assert high_asks <= 2, asked  # once on the way in (and once more if a second passed), not 11 times
    assert order[-1] == "high"
