"""A discrete-event simulator of a serving cluster, scaled by the autoscaler's own policy.

Why: the claims this system is built on (more requests within the SLO, more burst tolerance
than monolithic serving) are about clusters of GPUs, which no test machine here has. The
simulator replays a request trace against units of replicas whose step times, memory and
load times come from profiles, and lets `policy.ScalePolicy` (the very code `lego up` and the
Kubernetes actuator run) decide the replicas every tick. Micro-serving and monolithic serving
are the same simulation configured differently: a unit per model (encoder, VAE, one per base
model) or a unit per workflow (one replica holds the whole pipeline).

Modelled: FIFO queues per model; a replica serves one step at a time, the oldest queued step
of the models its unit hosts; a request's stages run in order (the models of a stage in
parallel); new replicas serve only after their load time; a replica told to stop finishes its
step first; GPUs whose memory holds the replicas placed on them and whose compute their
running steps share (time slicing); the policy's memory budget for the whole cluster. Not
modelled: batching, network time beyond a fixed per-stage hop, any cost of time slicing
itself (context switches, caches).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field

from services.autoscaler.policy import ConsumerLoad, PolicyConfig, ScalePolicy, UnitSignal, unit_signal


@dataclass(frozen=True)
class ModelProfile:
    """One model (or, monolithic, one whole pipeline): seconds per step, memory, load time."""

    step_s: float
    memory_bytes: int
    load_s: float


@dataclass(frozen=True)
class RequestOutcome:
    workflow: str
    arrived: float
    latency_s: float | None  # None: not finished when the trace ended


@dataclass
class _Request:
    workflow: str
    arrived: float
    stage: int = 0
    waiting_on: int = 0


@dataclass(eq=False)
class _Gpu:
    """A GPU shared by its replicas' steps in time slices: k steps at once each run at 1/k speed."""

    memory_free: int
    active: dict[_Replica, float] = field(default_factory=dict)  # step in hand -> seconds of work left
    last: float = 0.0  # when `active` was last brought up to date
    version: int = 0  # its pending "done" event is stale once this moves on


@dataclass(eq=False)
class _Replica:
    unit: str
    ready_at: float
    busy_until: float = 0.0
    retiring: bool = False
    job: tuple[_Request, str] | None = None
    gpu: _Gpu | None = None
    memory: int = 0


@dataclass
class Simulation:
    """`workflows`: name -> stages, each a list of model ids run in parallel, in order.
    `units`: unit -> the models its replicas host. `hop_s`: fixed overhead per stage (bus and
    tensor hops; 0 for an in-process pipeline). `gpus` > 0: that many GPUs of `gpu_memory_bytes`;
    a replica is placed on the one with the most free memory that holds it (none: it is not
    started), and the steps its replicas run at once share its compute equally (time slicing:
    a text encoder's short step is slowed by a denoising loop beside it, not queued behind the
    whole loop). `gpus` = 0: compute is not limited, only the policy's budget."""

    workflows: dict[str, list[list[str]]]
    models: dict[str, ModelProfile]
    units: dict[str, list[str]]
    policy: PolicyConfig
    start_replicas: dict[str, int] = field(default_factory=dict)
    tick_s: float = 1.0
    window_s: float = 10.0
    hop_s: float = 0.0
    gpus: int = 0
    gpu_memory_bytes: int = 80 * 2**30

    def __post_init__(self) -> None:
        self.unit_of = {m: u for u, ms in self.units.items() for m in ms}
        missing = {m for stages in self.workflows.values() for s in stages for m in s} - set(self.unit_of)
        if missing:
            raise ValueError(f"models {sorted(missing)} are in no unit")
        self.starts = 0  # replicas started by the policy (each a cold start)
        self.unplaced = 0  # replicas the policy wanted that no GPU had the memory for

    def solo_latency(self, workflow: str) -> float:
        """What a request of `workflow` takes with the cluster to itself."""
        return sum(max(self.models[m].step_s for m in stage) + self.hop_s for stage in self.workflows[workflow])

    def run(self, arrivals: list[tuple[float, str]], until: float) -> list[RequestOutcome]:
        """Replay `arrivals` [(time, workflow)]; requests unfinished at `until` count as not finished."""
        self._now = 0.0
        self._seq = itertools.count()
        self._events: list[tuple[float, int, str, object]] = []
        self._queues: dict[str, deque[tuple[float, _Request]]] = {m: deque() for m in self.unit_of}
        self._replicas: list[_Replica] = []
        self._gpus = [_Gpu(memory_free=self.gpu_memory_bytes) for _ in range(self.gpus)]
        self._arrived_steps: dict[str, deque[float]] = {m: deque() for m in self.unit_of}
        self._scaler = ScalePolicy(self.policy)
        self._outcomes: dict[int, RequestOutcome] = {}
        requests = [_Request(workflow=w, arrived=t) for t, w in sorted(arrivals)]
        for unit in self.units:
            for _ in range(self.start_replicas.get(unit, self.policy.limits_of(unit).min_replicas)):
                self._start(unit, ready_at=0.0)
        for r in requests:
            self._push(r.arrived, "arrive", r)
        self._push(0.0, "tick", None)
        while self._events and self._events[0][0] <= until:
            self._now, _, what, payload = heapq.heappop(self._events)
            if what == "arrive":
                assert isinstance(payload, _Request)
                self._enter_stage(payload)
            elif what == "done":
                assert isinstance(payload, _Replica)
                self._finish_step(payload)
            elif what == "gpu":
                gpu, version = payload  # type: ignore[misc]
                self._gpu_event(gpu, version)
            elif what == "tick":
                self._tick()
                self._push(self._now + self.tick_s, "tick", None)
            self._dispatch()
        return [self._outcomes.get(id(r), RequestOutcome(r.workflow, r.arrived, None)) for r in requests]

    # -- requests ---------------------------------------------------------------------------
    def _push(self, at: float, what: str, payload: object) -> None:
        heapq.heappush(self._events, (at, next(self._seq), what, payload))

    def _enter_stage(self, request: _Request) -> None:
        stage = self.workflows[request.workflow][request.stage]
        request.waiting_on = len(stage)
        for model in stage:
            self._queues[model].append((self._now, request))
            self._arrived_steps[model].append(self._now)

    def _finish_step(self, replica: _Replica) -> None:
        assert replica.job is not None
        request, _ = replica.job
        replica.job = None
        if replica.retiring:
            self._remove(replica)
        request.waiting_on -= 1
        if request.waiting_on:
            return
        request.stage += 1
        if request.stage == len(self.workflows[request.workflow]):
            self._outcomes[id(request)] = RequestOutcome(request.workflow, request.arrived, self._now - request.arrived)
        else:
            self._enter_stage(request)

    def _dispatch(self) -> None:
        """Every idle, ready replica takes the oldest step queued for its unit's models."""
        for replica in self._replicas:
            if replica.job is not None or replica.retiring or replica.ready_at > self._now:
                continue
            queued = [(self._queues[m][0][0], m) for m in self.units[replica.unit] if self._queues[m]]
            if not queued:
                continue
            _, model = min(queued)
            _, request = self._queues[model].popleft()
            replica.job = (request, model)
            work = self.models[model].step_s + self.hop_s
            if replica.gpu is None:
                replica.busy_until = self._now + work
                self._push(replica.busy_until, "done", replica)
            else:
                self._advance(replica.gpu)
                replica.gpu.active[replica] = work
                self._reschedule(replica.gpu)

    def _advance(self, gpu: _Gpu) -> None:
        """Bring the work left of the GPU's steps up to now (each ran at 1/k speed)."""
        if gpu.active:
            share = (self._now - gpu.last) / len(gpu.active)
            for replica in gpu.active:
                gpu.active[replica] -= share
        gpu.last = self._now

    def _reschedule(self, gpu: _Gpu) -> None:
        gpu.version += 1
        if gpu.active:
            left = min(gpu.active.values())
            self._push(self._now + max(0.0, left) * len(gpu.active), "gpu", (gpu, gpu.version))

    def _gpu_event(self, gpu: _Gpu, version: int) -> None:
        if version != gpu.version:
            return  # the GPU's set of steps changed since: a newer event stands
        self._advance(gpu)
        finished = [r for r, left in gpu.active.items() if left <= 1e-9]
        for replica in finished:
            del gpu.active[replica]
        self._reschedule(gpu)
        for replica in finished:
            self._finish_step(replica)

    # -- scaling ----------------------------------------------------------------------------
    def _signal(self, unit: str) -> UnitSignal:
        mine = [r for r in self._replicas if r.unit == unit and not r.retiring]
        return unit_signal(
            unit,
            len(mine),
            [self._load(model) for model in self.units[unit]],
            service_s=max(self.models[m].step_s for m in self.units[unit]),
            memory_bytes=sum(self.models[m].memory_bytes for m in self.units[unit]),
            device="cluster",
        )

    def _load(self, model: str) -> ConsumerLoad:
        """A model's queue as the autoscaler would observe it: steps queued or in hand, and the
        arrivals of the last `window_s` seconds."""
        times = self._arrived_steps[model]
        while times and times[0] < self._now - self.window_s:
            times.popleft()
        in_hand = sum(1 for r in self._replicas if r.job is not None and r.job[1] == model)
        return ConsumerLoad(
            backlog=len(self._queues[model]) + in_hand,
            arrival_rate=len(times) / self.window_s,
            step_s=self.models[model].step_s,
        )

    def _tick(self) -> None:
        decisions = self._scaler.decide([self._signal(u) for u in self.units], self._now)
        ups: list[tuple[str, int]] = []
        for decision in decisions:  # downs first: they free the memory the ups may need
            mine = [r for r in self._replicas if r.unit == decision.unit and not r.retiring]
            if decision.target > len(mine):
                ups.append((decision.unit, decision.target - len(mine)))
            elif decision.target < len(mine):
                # Still loading first, then idle ones, then busy ones (they finish their step).
                mine.sort(key=lambda r: (r.ready_at <= self._now, r.job is not None))
                for replica in mine[: len(mine) - decision.target]:
                    if replica.job is None:
                        self._remove(replica)
                    else:
                        replica.retiring = True
        for unit, count in ups:
            load_s = max(self.models[m].load_s for m in self.units[unit])
            for _ in range(count):
                if self._start(unit, ready_at=self._now + load_s):
                    self.starts += 1
                else:
                    self.unplaced += 1

    def _start(self, unit: str, ready_at: float) -> bool:
        """A new replica of `unit`, placed on the GPU with the most free memory that holds it."""
        memory = sum(self.models[m].memory_bytes for m in self.units[unit])
        gpu = None
        if self._gpus:
            fits = [g for g in self._gpus if g.memory_free >= memory]
            if not fits:
                return False
            gpu = max(fits, key=lambda g: g.memory_free)
            gpu.memory_free -= memory
        self._replicas.append(_Replica(unit=unit, ready_at=ready_at, gpu=gpu, memory=memory))
        return True

    def _remove(self, replica: _Replica) -> None:
        """Only an idle replica goes (a busy one retires after its step)."""
        self._replicas.remove(replica)
        if replica.gpu is not None:
            replica.gpu.memory_free += replica.memory

    def replicas_now(self) -> dict[str, int]:
        return {u: sum(1 for r in self._replicas if r.unit == u and not r.retiring) for u in self.units}


def attainment(outcomes: list[RequestOutcome], slo_s: dict[str, float]) -> float:
    """Fraction of requests finished within their workflow's SLO (unfinished ones miss it)."""
    if not outcomes:
        return math.nan
    met = sum(1 for o in outcomes if o.latency_s is not None and o.latency_s <= slo_s[o.workflow])
    return met / len(outcomes)
