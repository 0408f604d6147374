"""The leader's scheduler over its group: each request's degree, its devices, and batching.

At a request's first step (its loop's first transformer call, in the caller's thread) the
engine asks the shared policy (`shared.parallel_policy.choose_degree`) for its degree, given
the degrees the call can be split to, how many requests the group holds, their measured step
times and the request's slack before its deadline. The request joins a unit: an aligned block
of devices (its *home*: first device, degree) with its own step-level batching engine
(`batching.BatchEngine`), whose merged calls the executor runs over the unit's devices; a unit
whose devices are exactly that block and that already holds requests is reused, so they batch.

A unit's degree is a per-step property (adaptive mode): its *current* degree is read at every
call. When a request arrives, units split wider than the new fair share (k // requests held)
shrink to it on their first device, so the newcomer gets devices of its own instead of taking
turns step by step with a split request while other devices idle; when a request finishes,
units below their home degree grow back as far as their home, the fair share and the other
units' devices allow. Halving a degree is always a valid layout (CFG rows 2 -> 1, rows x tokens
4 -> 2, tokens 4 -> 2 -> 1), and every call is split row- and token-exactly, so a request that
changes degree mid-loop gives the unsplit result to float rounding. A change takes effect at
the unit's next call: the call in flight finishes on its old devices (`GroupExecutor.run`
hands calls to the lanes in one order under its lock, so collectives stay consistent).
A request on one device and a split request sharing that device take turns step by step, in
the order the lanes receive them.
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
from services.denoiser.group.hosted import can_host
from services.denoiser.group.split import layout
from services.denoiser.loop import DenoiseCancelled, DenoiseInputs, DenoiseLoop, TransformerCall
from shared.parallel_policy import DegreeChoice, DegreeInputs, choose_degree, degree_at_most

log = logging.getLogger("lego.denoiser.group")

Span = tuple[int, int]  # (first device, degree)


@dataclass(frozen=True)
class RequestFacts:
    """What the degree choice reads of a request: a label for the log, its denoising steps and
    its deadline (unix time; None: none known); and the loop's `inputs`, with which a follower
    can run the whole loop itself when the request gets one device of its own (`hosted.py`)."""

    label: str = ""
    steps: int = 1
    deadline: float | None = None
    inputs: DenoiseInputs | None = None


@dataclass(eq=False)
class _Unit:
    """A block of devices running its requests' merged calls: `first` device, `home` degree (the
    policy's choice), `degree` now (at most home; it shrinks and grows back), requests `held`."""

    first: int
    home: int
    degree: int
    engine: BatchEngine | None = None
    held: int = 0

    def devices(self) -> range:
        return range(self.first, self.first + self.degree)


def resumed(first: TransformerCall, loop: DenoiseLoop, done: Callable[[], None] | None = None) -> DenoiseLoop:
    """`loop`, whose first call was already taken, yielding that call again first. `done` is
    called as the loop ends (returns, fails or is closed), before its result is handed on."""
    call = first
    try:
        while True:
            out = yield call
            try:
                call = loop.send(out)
            except StopIteration as finished:
                return finished.value
    finally:
        if done is not None:
            done()


class GroupEngine:
    """Runs the denoising loops of one base model over a group of devices (see the module).

    `on_degree(degree)` is told every request's degree (metrics); `on_batch(n)` the requests of
    every batched call. `max_degree` caps the degrees offered to the policy (default: the
    group's size); like `mode`, it is read at each request's first step. Units shrink and grow
    in adaptive mode only: `always` and `never` are fixed baselines.
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
        self._units: list[_Unit] = []
        self.step_s: dict[int, float] = {}  # seconds per step of a lone request, by degree (running mean)
        self._entered = 0  # requests submitted so far: a request timed alone saw no other enter
        self._crowd = (0, 0.0)  # (requests held, until when it counts): see `_recent_others`

    def submit(
        self, loop: DenoiseLoop, loras: list[tuple[str, float]] | None = None, facts: RequestFacts | None = None
    ) -> Future[torch.Tensor]:
        """Choose the request's degree and devices, and queue it there: its loop here, step by
        step, or its whole loop on a follower (`hosted.py`) when it gets one device of its own.

        Which degrees a request can take is known from its first call, which costs the loop's
        start (its scheduler, its noise: about 1 ms of a tiny model's 8 ms step). A request a
        follower may run whole is first placed as if it could take every degree: a choice of 1
        over every degree is a choice of 1 over any of them (the policy's rule never prefers a
        split for having fewer to choose from), and then the follower starts the loop, not this
        process too. Only a choice above 1 needs the first call, to know the split is possible."""
        facts = facts or RequestFacts()
        started = time.perf_counter()
        most = min(self.world, self.max_degree)
        first: TransformerCall | None = None
        may_host = can_host(facts.inputs) and all(self.executor.can_host(d) for d in range(self.world))
        while True:
            if first is None and not may_host:
                with torch.inference_mode():
                    first = next(loop)
            allowed = tuple(
                d for d in (1, 2, 4) if d <= most and (first is None or layout(d, first, self.executor.by_tokens))
            )
            with self._lock:
                busy = sum(u.held for u in self._units)
                choice = self._choose(allowed, max(busy, self._recent_others()), facts)
                if first is None and choice.degree > 1:
                    may_host = False  # a split: the first call says whether it can be, then choose again
                    continue
                if self.mode == "adaptive":
                    self._shrink(self.world // (busy + 1), busy + 1)
                self._entered += 1
                ticket = self._entered
                unit = self._unit_for(self._least_loaded(choice.degree))
                unit.held += 1
                engine = self._engine(unit)
            break
        log.info(
            "request %s: degree %d on devices %d-%d (%s; allowed %s)",
            facts.label or "?",
            choice.degree,
            unit.first,
            unit.first + choice.degree - 1,
            choice.reason,
            list(allowed),
        )
        if self._on_degree is not None:
            self._on_degree(choice.degree)
        release = self._releaser(unit)
        if choice.degree == 1 and can_host(facts.inputs) and self.executor.can_host(unit.first):
            loop.close()  # the follower builds the same loop from the same inputs
            future = self._hosted(unit, facts, loras, release)
        else:
            if first is None:
                with torch.inference_mode():
                    first = next(loop)
            try:
                future = engine.submit(resumed(first, loop, release), loras)
            except BaseException:
                release()
                raise
            future.add_done_callback(lambda _f: release())  # a loop closed before it started runs no `finally`
        if busy == 0:
            future.add_done_callback(self._timer(choice.degree, started, ticket, facts.steps))
        return future

    def _choose(self, allowed: tuple[int, ...], busy: int, facts: RequestFacts) -> DegreeChoice:
        slack = None if facts.deadline is None else facts.deadline - time.time()
        return choose_degree(
            DegreeInputs(self.world, allowed, busy=busy, slack_s=slack, steps=facts.steps, step_s=dict(self.step_s)),
            self.mode,
        )

    def _hosted(
        self, unit: _Unit, facts: RequestFacts, loras: list[tuple[str, float]] | None, release: Callable[[], None]
    ) -> Future[torch.Tensor]:
        assert facts.inputs is not None
        try:
            if facts.inputs.should_stop is not None and facts.inputs.should_stop():
                raise DenoiseCancelled("stopped before its first step")  # as the loop's own first check
            future = self.executor.host(
                unit.first,
                facts.inputs,
                tuple(loras or ()),
                self.max_batch,
                on_batch=self._on_batch,
            )
        except BaseException:
            release()
            raise
        future.add_done_callback(lambda _f: release())
        return future

    def _timer(self, degree: int, started: float, ticket: int, steps: int) -> Callable[[Future[torch.Tensor]], None]:
        """Times a request that found the group idle: its seconds per step, from submission to
        its latents, count for the policy if no other request entered the group before it ended.

        Why whole requests, timed here, for every degree alike: the policy compares the degrees,
        so each must be measured the same way and with everything the request pays. A step
        timed on a follower's device leaves out the hand-over and the answer; a split step
        timed here includes its round trip: compared, they favoured one device where the split
        request was faster (tiny SD3, 1 client: 0.041 s split against 0.049 s whole, kept on one
        device). And a request that shared the group with another, even for one step, would
        carry that one's work: a split slowed by newcomers once would look slower for good
        (a lone request is only split again if its measured step is the faster)."""

        def note(future: Future[torch.Tensor]) -> None:
            if future.cancelled() or future.exception() is not None:
                return
            seconds = (time.perf_counter() - started) / max(steps, 1)
            with self._lock:
                if self._entered != ticket:
                    return
                old = self.step_s.get(degree)
                self.step_s[degree] = seconds if old is None else 0.8 * old + 0.2 * seconds

        return note

    def _releaser(self, unit: _Unit) -> Callable[[], None]:
        """Hands the request's place in `unit` back once, whichever of its ends comes first."""
        once = threading.Lock()

        def release() -> None:
            if once.acquire(blocking=False):
                self._release(unit)

        return release

    def _recent_others(self) -> int:
        """The requests a newcomer should expect beside it: those of a crowd that was here a
        moment ago, less itself (0 once the moment is over).

        Why: requests that end together come back together (a client's batch, a closed loop, a
        burst). The first of them to arrive finds the group idle; split, it holds every device
        for a step, and the second, a millisecond later, waits that step before the first can
        shrink (real-width SD3, 2 clients in step: 0.876 of the 2 replicas' rate in one repeat).
        So a group that held several requests within its longest measured step (about what a
        newcomer would wait behind a split step) counts them as still here."""
        held, until = self._crowd
        return held - 1 if held > 1 and time.perf_counter() < until else 0

    def _release(self, unit: _Unit) -> None:
        with self._lock:
            held = sum(u.held for u in self._units)
            if held > 1:
                self._crowd = (held, time.perf_counter() + max(self.step_s.values(), default=0.0))
            unit.held -= 1
            if unit.held == 0:
                unit.degree = unit.home  # an idle unit starts at home again
            if self.mode == "adaptive":
                self._grow()

    def _shrink(self, share: int, requests: int) -> None:
        """Units holding requests and split wider than the fair share `share` shrink to it."""
        fair = degree_at_most(share)
        for unit in self._units:
            if unit.held and unit.degree > fair:
                self._resize(unit, fair, f"shrink: {requests} requests on {self.world} devices")

    def _grow(self) -> None:
        """Units below their home degree take back as much of it as the fair share and the
        other units' devices allow."""
        requests = sum(u.held for u in self._units)
        fair = degree_at_most(self.world // max(requests, 1))
        for unit in self._units:
            if not unit.held or unit.degree >= unit.home:
                continue
            taken = {r for other in self._units if other is not unit and other.held for r in other.devices()}
            wider = [
                d
                for d in (4, 2)
                if unit.degree < d <= min(unit.home, fair) and not taken & set(range(unit.first, unit.first + d))
            ]
            if wider:
                self._resize(unit, wider[0], f"grow: {requests} request(s) on {self.world} devices")

    def _resize(self, unit: _Unit, degree: int, why: str) -> None:
        log.info(
            "unit %d-%d: degree %d -> %d on devices %d-%d (%s)",
            unit.first,
            unit.first + unit.home - 1,
            unit.degree,
            degree,
            unit.first,
            unit.first + degree - 1,
            why,
        )
        unit.degree = degree

    def _least_loaded(self, degree: int) -> Span:
        """The aligned block of `degree` devices whose busiest device holds the fewest requests,
        counted over the units' current devices."""

        def device_load(rank: int) -> int:
            return sum(u.held for u in self._units if rank in u.devices())

        blocks = [(first, degree) for first in range(0, self.world, degree)]
        return min(blocks, key=lambda b: (max(device_load(r) for r in range(b[0], b[0] + degree)), b[0]))

    def _unit_for(self, block: Span) -> _Unit:
        """The unit to run on `block`: one already there with requests (they batch), else an idle
        one whose home it is, else a new one."""
        first, degree = block
        running = [u for u in self._units if u.held and (u.first, u.degree) == block]
        if running:
            return running[0]
        for unit in self._units:
            if not unit.held and (unit.first, unit.home) == block:
                unit.degree = degree
                return unit
        unit = _Unit(first=first, home=degree, degree=degree)
        self._units.append(unit)
        return unit

    def _engine(self, unit: _Unit) -> BatchEngine:
        if unit.engine is None:
            unit.engine = BatchEngine(
                None,
                self.max_batch,
                activate_loras=lambda _chosen: None,  # each device switches its own (device.Device)
                on_batch=self._on_batch,
                name=f"group-unit-{unit.first}x{unit.home}",
                execute=self._executor_of(unit),
            )
        return unit.engine

    def _executor_of(self, unit: _Unit) -> Callable[[TransformerCall, LoraSet, int], torch.Tensor]:
        def execute(call: TransformerCall, loras: LoraSet, requests: int) -> torch.Tensor:
            with self._lock:
                first, degree = unit.first, unit.degree  # read at every call: the unit may have shrunk or grown
            how = layout(degree, call, self.executor.by_tokens)
            if how is None:
                raise ValueError(f"a call of {call.rows()} rows cannot be split over {degree} devices")
            return self.executor.run(first, call, how, loras)

        return execute

    def close(self) -> None:
        for unit in list(self._units):
            if unit.engine is not None:
                unit.engine.close()
        self.executor.close()
