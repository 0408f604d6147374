"""The step worker loop every model replica runs: fetch, keep alive, ack / term / nak.

Steps are pulled band by band, higher priority first, lower never starved
(`priority_pull.PriorityPuller` states the guarantee). The rules, so that nothing is lost and
nothing is answered twice:
- a step is acked only after its result is published, so a replica killed mid-step leaves it
  unacked and JetStream redelivers it to another replica after AckWait;
- long steps send `in_progress()` so a slow but live replica keeps its step;
- bad input (`BadStepInput`) is terminated at once with an error result: a retry cannot help;
- other faults are nak'ed with a delay, until MaxDeliver; the last attempt answers an error;
- a node already answered is acked without a second result (local memory, and the result
  stream's Nats-Msg-Id dedupe across replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from pydantic import ValidationError

from shared import tracing
from shared.bus import Bus
from shared.keep_alive import KeepAlive, keep_alive_s
from shared.messages import ErrorInfo, StepEnvelope, StepKind, StepRequest, StepResult
from shared.metrics import StepMetrics
from shared.priority_pull import FAIR_EVERY, PriorityPuller

log = logging.getLogger("lego.worker")

FETCH_POLL_S = 2.0
NAK_DELAY_S = 1.0


class BadStepInput(ValueError):
    """The step cannot succeed on any replica (bad params, wrong tensor shapes): no retry."""


class InputLost(Exception):
    """Inputs whose producer no longer holds them (it died, or they expired). No replica can
    fetch them, so the step ends here; the gateway re-runs the producing nodes."""

    def __init__(self, names: list[str], reason: str) -> None:
        super().__init__(f"inputs {names} are gone from their producer: {reason}")
        self.names = names


class StepCancelled(Exception):
    """The step's request was cancelled while it ran (e.g. the denoiser left its loop)."""


class CancelledRuns:
    """Run ids cancelled recently (a `lego.cancel` broadcast): their steps are dropped before
    they start, and running ones stop at their next check. Forgotten after `keep_s`, since a
    cancelled request's steps are all gone from the queue by then."""

    def __init__(self, keep_s: float = 3600.0) -> None:
        self.keep_s = keep_s
        self._runs: OrderedDict[str, float] = OrderedDict()

    def add(self, run_id: str) -> None:
        now = time.monotonic()
        self._runs[run_id] = now
        while self._runs and next(iter(self._runs.values())) < now - self.keep_s:
            self._runs.popitem(last=False)

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._runs


StepHandler = Callable[[StepRequest], Awaitable[StepResult]]


class StepWorker:
    """Consumes one (kind, model) consumer on behalf of one replica."""

    def __init__(
        self,
        bus: Bus,
        kind: StepKind | str,
        model_id: str,
        handler: StepHandler,
        replica_id: str,
        remember: int = 4096,
        cancelled: CancelledRuns | None = None,
        concurrency: int = 1,
        fair_every: int = FAIR_EVERY,
    ) -> None:
        self.bus = bus
        self.kind = kind
        self.model_id = model_id
        self.handler = handler
        self.replica_id = replica_id
        # Steps in hand at once: 1, or a batching runner's max batch (it computes them together).
        self.concurrency = max(1, concurrency)
        self.fair_every = fair_every  # a lower priority band is served at least once in fair_every + 1 steps
        self._running = 0
        self._busy_since = 0.0  # with several steps in hand: when the current busy stretch began
        self._last_done = 0.0
        self.steps_done = 0
        self.seconds_per_item = 0.0  # moving average of a step's compute time (the autoscaler reads it)
        self.cancelled = cancelled if cancelled is not None else CancelledRuns()
        self._answered: OrderedDict[tuple[str, str, int], None] = OrderedDict()
        self._remember = remember
        self._metrics = StepMetrics(str(kind), model_id)
        self._span_name = f"{kind} {model_id}"

    @property
    def busy(self) -> bool:
        return self._running > 0

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and handle steps until `stop` is set; the steps in hand are finished first.

        Up to `concurrency` steps are in hand at once, each handled in its own task; a step is
        fetched only when there is room for it, so the rest stay in the stream for other replicas.
        """
        puller = PriorityPuller(self.bus, self.kind, self.model_id, self.fair_every)
        await puller.start()
        log.info(
            "consuming kind=%s model=%s replica=%s concurrency=%d",
            self.kind,
            self.model_id,
            self.replica_id,
            self.concurrency,
        )
        in_hand: set[asyncio.Task] = set()
        try:
            while not stop.is_set():
                room = self.concurrency - len(in_hand)
                if room <= 0:
                    await asyncio.wait(in_hand, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    msgs = await puller.fetch(room, FETCH_POLL_S)
                except Exception as exc:
                    if stop.is_set():
                        break
                    log.warning("fetch failed (%s); retrying", exc)
                    await asyncio.sleep(0.5)
                    continue
                if self.concurrency == 1:
                    for msg in msgs:
                        await self.process(msg)
                    continue
                for msg in msgs:
                    task = asyncio.create_task(self.process(msg))
                    in_hand.add(task)
                    task.add_done_callback(in_hand.discard)
        finally:
            if in_hand:
                await asyncio.gather(*in_hand, return_exceptions=True)
            await puller.close()  # steps delivered but not started go back to the stream now

    async def process(self, msg: Msg) -> None:
        """Handle one delivery in its trace span `<kind> <model>` (a child of the span that
        published the step, beside a `queue.wait` span) and count it in the step metrics."""
        received = time.time()
        published = _published_at(msg, received)
        waited = max(0.0, received - published)
        parent = tracing.extract(msg.headers)
        attributes = None
        if tracing.enabled():
            attributes = {
                "lego.kind": str(self.kind),
                "lego.model_id": self.model_id,
                "lego.replica_id": self.replica_id,
                "lego.queue_wait_s": waited,
                "lego.delivery": msg.metadata.num_delivered if msg.metadata else 1,
                "messaging.system": "nats",
                "messaging.destination.name": msg.subject,
            }
            tracing.record("queue.wait", published, received, attributes, parent)
        self._metrics.queue_wait.observe(waited)
        self._metrics.in_flight.inc()
        outcome = "error"
        try:
            with tracing.span(self._span_name, attributes, parent) as sp:
                outcome = await self._handle(msg, received, waited, sp)
                tracing.annotate(sp, {"lego.outcome": outcome}, None if outcome in ("ok", "duplicate") else outcome)
        finally:
            self._metrics.in_flight.dec()
            self._metrics.finished(outcome, time.time() - received)

    async def _handle(self, msg: Msg, received: float, waited: float, sp: tracing.Span | None) -> str:
        """Settle one delivery (ack / term / nak); returns its outcome: "ok" or an error code."""
        try:
            step = StepRequest.model_validate_json(msg.data)
        except ValidationError as exc:
            await self._refuse_malformed(msg, exc)
            return "malformed"
        tracing.annotate(
            sp, {"lego.request_id": step.request_id, "lego.node_id": step.node_id, "lego.attempt": step.attempt}
        )
        refused = await self._refuse(msg, step, received)
        if refused is not None:
            return refused
        return await self._compute(msg, step, received, waited)

    async def _refuse_malformed(self, msg: Msg, exc: ValidationError) -> None:
        """Term a step that does not parse, answering its sender when it says who that is."""
        first = exc.errors(include_url=False)[:1]
        log.error("terminating malformed step on %s: %s", msg.subject, first)
        try:
            env = StepEnvelope.model_validate_json(msg.data)
        except ValidationError:
            await msg.term()  # no one to answer: the sender learns of it at its deadline
            return
        where = ".".join(str(p) for p in first[0]["loc"]) if first else "?"
        reason = f"malformed step: {where}: {first[0]['msg'] if first else exc}"
        await self.bus.publish_result(env.reply_to, _error(env, self, "bad_step_input", reason))
        await msg.term()

    async def _refuse(self, msg: Msg, step: StepRequest, received: float) -> str | None:
        """Settle, without running it, a step answered already, past its deadline or cancelled;
        returns that outcome, or None for a step to run."""
        key = (step.request_id, step.node_id, step.attempt)
        if key in self._answered:
            log.info("duplicate delivery of %s/%s attempt %d ignored", *key)
            await msg.ack()
            return "duplicate"
        if step.expired(received):
            await self._settle(msg, step, _error(step, self, "deadline_exceeded", "the request's deadline passed"))
            return "deadline_exceeded"
        if step.request_id in self.cancelled:
            log.info("dropping step %s/%s: its request was cancelled", step.request_id, step.node_id)
            await self._settle(msg, step, _error(step, self, "cancelled", "the request was cancelled"))
            return "cancelled"
        return None

    async def _compute(self, msg: Msg, step: StepRequest, received: float, waited: float) -> str:
        """Run the handler, keeping the step alive meanwhile; publish its result, then ack."""
        started = time.perf_counter()
        if self._running == 0:
            self._busy_since = started
        self._running += 1
        keepalive = KeepAlive(msg, keep_alive_s(self.bus.settings))
        if self.concurrency == 1:
            self._metrics.batch.observe(1)  # one step per model call (a batching runner reports its own)
        try:
            result = await self.handler(step)
        except Exception as exc:
            return await self._settle_failure(msg, step, exc)
        finally:
            keepalive.cancel()
            self._running -= 1
        result.queue_wait_s = waited
        await self._settle(msg, step, result)
        self.steps_done += 1
        self._time_step(result, started)
        return "ok" if result.ok else "error"

    async def _settle_failure(self, msg: Msg, step: StepRequest, exc: Exception) -> str:
        """A handler that raised: bad input, lost inputs and cancels end the step at once with
        their error; another fault is retried (nak) until its last delivery answers an error."""
        if isinstance(exc, BadStepInput):
            await self._settle(msg, step, _error(step, self, "bad_step_input", str(exc)))
            return "bad_step_input"
        if isinstance(exc, InputLost):
            await self._settle(msg, step, _error(step, self, "input_lost", str(exc), lost_inputs=exc.names))
            return "input_lost"
        if isinstance(exc, StepCancelled):
            await self._settle(msg, step, _error(step, self, "cancelled", str(exc) or "the request was cancelled"))
            return "cancelled"
        key = (step.request_id, step.node_id, step.attempt)
        delivered = msg.metadata.num_delivered if msg.metadata else 1
        if delivered >= self.bus.settings.max_deliver:
            log.exception("step %s/%s (attempt %d) failed on its last delivery", *key)
            await self._settle(msg, step, _error(step, self, "step_failed", f"{type(exc).__name__}: {exc}"))
            return "step_failed"
        log.warning("step %s/%s failed (delivery %d): %s; will retry", *key[:2], delivered, exc)
        await msg.nak(delay=NAK_DELAY_S)
        return "retry"

    def _time_step(self, result: StepResult, started: float) -> None:
        """What one step cost, for `seconds_per_item` (the autoscaler reads it)."""
        if self.concurrency == 1:
            # Compute time (the replica's compute thread busy on this step), else the whole handling.
            self._measured(result.compute_s or (time.perf_counter() - started))
        else:
            # Steps computed together: what one costs is the busy time between completions (a
            # replica batching 4 at once serves each in a quarter of a loop's wall time).
            now = time.perf_counter()
            self._measured(now - max(self._busy_since, self._last_done))
            self._last_done = now

    def _measured(self, seconds: float, weight: float = 0.3) -> None:
        """Fold one step's time into `seconds_per_item` (exponential moving average)."""
        old = self.seconds_per_item
        self.seconds_per_item = seconds if old == 0.0 else (1 - weight) * old + weight * seconds

    async def _settle(self, msg: Msg, step: StepRequest, result: StepResult) -> None:
        """Publish the step's one result, then ack it (success) or term it (an error no retry fixes)."""
        try:
            fresh = await self.bus.publish_result(step.reply_to, result)
        except Exception as exc:  # NATS away longer than the bus retries: run it again later
            log.warning("result of %s/%s not published (%s); handing the step back", step.request_id, step.node_id, exc)
            with contextlib.suppress(Exception):
                await msg.nak(delay=NAK_DELAY_S)
            return
        if not fresh:
            log.info("result for %s/%s was already published; not sent again", step.request_id, step.node_id)
        self._answered[(step.request_id, step.node_id, step.attempt)] = None
        while len(self._answered) > self._remember:
            self._answered.popitem(last=False)
        await (msg.ack() if result.ok else msg.term())


def _error(
    step: StepRequest | StepEnvelope, worker: StepWorker, code: str, message: str, lost_inputs: list[str] | None = None
) -> StepResult:
    # Lost inputs and exhausted faults may succeed if the whole request is tried again.
    retryable = code in ("input_lost", "step_failed")
    return StepResult(
        request_id=step.request_id,
        node_id=step.node_id,
        attempt=step.attempt,
        ok=False,
        error=ErrorInfo(code=code, message=message, retryable=retryable, lost_inputs=lost_inputs or []),
        replica_id=worker.replica_id,
    )


def _published_at(msg: Msg, default: float) -> float:
    md = msg.metadata
    if md is None or md.timestamp is None:
        return default
    return md.timestamp.timestamp()
