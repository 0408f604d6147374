"""The leader's scheduler over its group: each request's degree, its devices, and batching.

At a request's first step (its loop's first transformer call, in the caller's thread) the
engine asks the shared policy (`shared.parallel_policy.choose_degree`) for its degree, given
the degrees the call can be split to, how many requests the group holds and the request's
slack before its deadline; it then binds the request to the least loaded aligned block of
that many devices for the rest of its loop (its scheduler state lives here, on the leader).
Each block is a unit with its own step-level batching engine (`batching.BatchEngine`), whose
merged calls the executor runs over the block's devices. A request on one device and a split
request sharing that device take turns step by step, in the order the lanes receive them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from services.denoiser.batching import BatchEngine, LoraSet
from services.denoiser.group.executor import GroupExecutor
from services.denoiser.group.split import layout
from services.denoiser.loop import DenoiseLoop, TransformerCall
from shared.parallel_policy import DegreeInputs, choose_degree

log = logging.getLogger("lego.denoiser.group")

Unit = tuple[int, int]  # (first device, degree)


@dataclass(frozen=True)
class RequestFacts:
    """What the degree choice reads of a request: a label for the log, its denoising steps and
    its deadline (unix time; None: none known)."""

    label: str = ""
    steps: int = 1
    deadline: float | None = None


def resumed(first: TransformerCall, loop: DenoiseLoop) -> DenoiseLoop:
    """`loop`, whose first call was already taken, yielding that call again first."""
    call = first
    while True:
        out = yield call
        try:
            call = loop.send(out)
        except StopIteration as done:
            return done.value


class GroupEngine:
    """Runs the denoising loops of one base model over a group of devices (see the module).

    `on_degree(degree)` is told every request's degree (metrics); `on_batch(n)` the requests of
    every batched call. `max_degree` caps the degrees offered to the policy (default: the
    group's size); like `mode`, it is read at each request's first step.
    """

    def __init__(
        self,
        executor: GroupExecutor,
        max_batch: int,
        mode: str = "adaptive",
        on_degree: Callable[[int], None] | None = None,
        on_batch: Callable[[int], None] | None = None,
        max_degree: int | None = None,
    ) -> None:
        choose_degree(DegreeInputs(group_size=executor.world, allowed=(1,)), mode)  # refuses an unknown mode now
        self.executor = executor
        self.world = executor.world
        self.max_batch = max_batch
        self.mode = mode
        self.max_degree = max_degree or executor.world
        self._on_degree = on_degree
        self._on_batch = on_batch
        self._lock = threading.Lock()
        self._units: dict[Unit, BatchEngine] = {}
        self._held: dict[Unit, int] = {}  # requests each unit holds now
        self.step_s: dict[int, float] = {}  # seconds per call of one request, by degree (running mean)

    def submit(
        self, loop: DenoiseLoop, loras: list[tuple[str, float]] | None = None, facts: RequestFacts | None = None
    ) -> Future[torch.Tensor]:
        """Take the request's first call here, choose its degree and devices, and queue it there."""
        facts = facts or RequestFacts()
        with torch.inference_mode():
            first = next(loop)
        most = min(self.world, self.max_degree)
        allowed = tuple(d for d in (1, 2, 4) if d <= most and layout(d, first, self.executor.by_tokens))
        with self._lock:
            busy = sum(self._held.values())
            slack = None if facts.deadline is None else facts.deadline - time.time()
            choice = choose_degree(
                DegreeInputs(
                    self.world, allowed, busy=busy, slack_s=slack, steps=facts.steps, step_s=dict(self.step_s)
                ),
                self.mode,
            )
            unit = self._least_loaded(choice.degree)
            self._held[unit] = self._held.get(unit, 0) + 1
            engine = self._engine(unit)
        log.info(
            "request %s: degree %d on devices %d-%d (%s; allowed %s)",
            facts.label or "?",
            choice.degree,
            unit[0],
            unit[0] + unit[1] - 1,
            choice.reason,
            list(allowed),
        )
        if self._on_degree is not None:
            self._on_degree(choice.degree)
        try:
            future = engine.submit(resumed(first, loop), loras)
        except BaseException:
            self._release(unit)
            raise
        future.add_done_callback(lambda _f: self._release(unit))
        return future

    def _release(self, unit: Unit) -> None:
        with self._lock:
            self._held[unit] -= 1

    def _least_loaded(self, degree: int) -> Unit:
        """The aligned block of `degree` devices whose busiest device holds the fewest requests."""

        def device_load(rank: int) -> int:
            return sum(n for (first, d), n in self._held.items() if first <= rank < first + d)

        blocks = [(first, degree) for first in range(0, self.world, degree)]
        return min(blocks, key=lambda b: (max(device_load(r) for r in range(b[0], b[0] + degree)), b[0]))

    def _engine(self, unit: Unit) -> BatchEngine:
        if unit not in self._units:
            self._units[unit] = BatchEngine(
                None,
                self.max_batch,
                activate_loras=lambda _chosen: None,  # each device switches its own (device.Device)
                on_batch=self._on_batch,
                name=f"group-unit-{unit[0]}x{unit[1]}",
                execute=self._executor_of(unit),
            )
        return self._units[unit]

    def _executor_of(self, unit: Unit) -> Callable[[TransformerCall, LoraSet, int], torch.Tensor]:
        first, degree = unit

        def execute(call: TransformerCall, loras: LoraSet, requests: int) -> torch.Tensor:
            how = layout(degree, call, self.executor.by_tokens)
            if how is None:
                raise ValueError(f"a call of {call.rows()} rows cannot be split over {degree} devices")
            started = time.perf_counter()
            out = self.executor.run(first, call, how, loras)
            if requests == 1:
                took = time.perf_counter() - started
                with self._lock:
                    old = self.step_s.get(degree)
                    self.step_s[degree] = took if old is None else 0.8 * old + 0.2 * took
            return out

        return execute

    def close(self) -> None:
        for engine in list(self._units.values()):
            engine.close()
        self.executor.close()
