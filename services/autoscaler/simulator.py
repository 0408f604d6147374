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
running steps share (time slicing); the policy's memory budget for the whole cluster.

Parallel groups (issue 14): a unit's replica may own a group of k devices (`group_size`), its
memory on k GPUs. It takes a queued step for each of its devices that none of its own steps
uses, and splits each over d of its devices as `shared.parallel_policy.choose_degree` says
(the rule the denoiser's groups run), given the other requests it holds and the request's
slack (its SLO less the time its later stages take alone). A step at degree d takes the
model's time at that degree (`ModelProfile.degree_s`) on each of the d devices, the least used
of the group's first; d = 1 steps run side by side, one a device. A device shared by several
steps time-slices them as any GPU does; a split step is done when its last device is. In the
adaptive mode a split step shrinks and grows as the denoiser's groups do
(`services/denoiser/group/engine.py`): when steps wait for a group whose devices are all in
use, its split steps shrink to the fair share (k // the requests it would hold), freeing
devices for them; when devices fall idle with nothing queued, a shrunk step grows back towards
its first degree. The work left moves with it: the fraction of the step left, at the new
degree's time.

Trace requests (issue 15): `run` also takes the requests of a trace (`TracedRequest`, the
fields of `bench/traces/record.py`'s `TraceRequest`: timestamp, base model, ControlNets, LoRAs,
workflow); `route` names each one's workflow. A model with `Adapters` (a denoiser, or a whole
pipeline that holds one) pays for the request's ControlNets and LoRAs when it runs its step:

- ControlNets: a ControlNet runs at every denoising step beside the base model (its residuals
  feed the base model's step), so it lengthens the run. Co-located (`controlnet_link` None):
  its compute, `controlnet_s`, runs on the denoiser's device (time-sliced with the rest there),
  and the replica keeps `controlnet_slots` ControlNets loaded (their memory is in the model's
  `memory_bytes`), least recently used out; a miss waits `controlnet_load_s`. Elsewhere (a
  `Link`: NVLink, PCIe, the network): the ControlNets run side by side on other devices, and
  the denoiser waits each step for their compute and their residuals over the link:
  `controlnet_s` + `steps` x (n x `residual_bytes` / bandwidth + latency), its device free
  meanwhile. Those devices are not simulated (their ControlNets kept loaded, their compute
  not counted against the cluster): a remote ControlNet is priced in latency only.
- LoRAs: a replica keeps `lora_slots` LoRAs loaded, least recently used out; a miss waits
  `lora_load_s` (host memory into new layers of the model) while the replica has a free slot,
  `lora_swap_s` once its slots are full (the denoiser swaps the LoRA into the least recently
  used slot's layers, `services/denoiser/lora.py`; 0: as `lora_load_s`), plus `lora_disk_s` when the node's host
  memory (`host_lora_slots` files, least recently used out, shared by the node's replicas) does
  not hold the file.
- Loads hold the replica but not its device's compute (they are copies and the host's work).
- The autoscaler sees such a model's step time as its replicas measure it: the mean of what its
  steps took so far (loads, ControlNets and batches included), not the profile's bare figure.

Step-level batching: a lone replica of a model with `max_batch` > 1 takes with the oldest queued
step the next queued steps of the same model with the same ControlNets and LoRAs (the
denoiser's batch engine's rule: the oldest leads every call, whoever fits rides along), up to
`max_batch`, looking through the first `batch_scan` queued; the call takes `batch_s(b)` and all
its steps finish together. Requests do not join a call already running (the engine adds them
at the next denoising step), so batching here is slightly pessimistic.

Scale: dispatch visits only the replicas that can act (idle lone replicas of units with steps
queued, groups), arrivals are read in order rather than all put on the event heap, and the
steps in replicas' hands are counted as they start and end: 1,000 GPUs run in minutes.

Not modelled: network time beyond a fixed per-stage hop (and a remote ControlNet's link), any
cost of time slicing itself (context switches, caches), the lockstep of a split step's devices
(each device's share runs at that device's pace; the exchange is in the degree's time),
batching on groups.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from services.autoscaler.placement import MIN_SHARE, choose_device, share_of
from services.autoscaler.policy import (
    MODES,
    ConsumerLoad,
    DegreeInputs,
    PolicyConfig,
    ScalePolicy,
    UnitSignal,
    choose_degree,
    degree_at_most,
    unit_signal,
)


@dataclass(frozen=True)
class Link:
    """A path a ControlNet's residuals take to the denoiser each step: bytes per second and a
    fixed latency per transfer."""

    bytes_per_s: float
    latency_s: float = 0.0

    def transfer_s(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


@dataclass(frozen=True)
class Adapters:
    """What ControlNets and LoRAs cost a model that runs them (a denoiser, or a whole pipeline
    holding one). See "ControlNets" and "LoRAs" in the module docstring."""

    steps: int = 28  # denoising steps: a remote ControlNet's residuals cross the link this often
    controlnet_s: float = 0.0  # seconds one ControlNet adds to the model's run (all its steps)
    controlnet_load_s: float = 0.0  # host memory -> device, at a replica's cache miss
    residual_bytes: int = 0  # one ControlNet's residuals for one step (CFG rows included)
    controlnet_slots: int = 0  # ControlNets a replica keeps loaded (least recently used goes)
    lora_load_s: float = 0.0  # host memory -> new layers of the model, at a miss with a slot free
    lora_swap_s: float = 0.0  # host memory -> a used slot's layers, at a miss with the slots full (0: lora_load_s)
    lora_disk_s: float = 0.0  # more when the file is not in the node's host memory
    lora_slots: int = 0  # LoRAs a replica keeps loaded (least recently used goes)
    host_lora_slots: int = 0  # LoRA files a node keeps in host memory (least recently used goes)


@dataclass(frozen=True)
class ModelProfile:
    """One model (or, monolithic, one whole pipeline): seconds per step, memory, load time, and
    the seconds a step takes split over d devices of a group (`degree_s`, d > 1; a degree not
    listed is one the model cannot be split to). `max_batch` > 1: a lone replica runs up to that
    many queued steps of this model with the same ControlNets and LoRAs in one call, in
    `step_s` x b / `batch_speedup`[b] (the largest b listed at or below; 1 when none).
    `adapters`: its ControlNet and LoRA costs (None: it runs neither)."""

    step_s: float
    memory_bytes: int
    load_s: float
    degree_s: Mapping[int, float] = field(default_factory=dict)
    max_batch: int = 1
    batch_speedup: Mapping[int, float] = field(default_factory=dict)
    adapters: Adapters | None = None

    def batch_s(self, b: int) -> float:
        """Seconds a call of b steps takes."""
        if b == 1:
            return self.step_s
        speedup = max(((k, v) for k, v in self.batch_speedup.items() if k <= b), default=(1, 1.0))[1]
        return self.step_s * b / speedup


class TracedRequest(Protocol):
    """A trace request as `bench/traces/record.py` writes it (its `TraceRequest` is one)."""

    @property
    def timestamp(self) -> float: ...
    @property
    def base_model(self) -> str: ...
    @property
    def controlnets(self) -> Sequence[str]: ...
    @property
    def loras(self) -> Sequence[str]: ...
    @property
    def workflow(self) -> str | None: ...


def default_route(request: TracedRequest) -> str:
    """The request's own workflow name, else its base model's."""
    return request.workflow or request.base_model


@dataclass(frozen=True)
class RequestOutcome:
    workflow: str
    arrived: float
    latency_s: float | None  # None: not finished when the trace ended
    degree: int = 1  # the most devices one of its steps was split over (1: never split)
    index: int = -1  # its place in the arrivals given to `run`


@dataclass
class _Request:
    workflow: str
    arrived: float
    stage: int = 0
    waiting_on: int = 0
    degree: int = 1
    controlnets: tuple[str, ...] = ()
    loras: tuple[str, ...] = ()
    index: int = -1


@dataclass(eq=False)
class _Gpu:
    """A GPU shared by its replicas' steps in time slices: k steps at once each run at 1/k speed."""

    memory_free: int
    node: int = 0
    committed: float = 0.0  # the compute shares of the replicas placed on it (services/autoscaler/placement.py)
    active: dict[_Job, float] = field(default_factory=dict)  # step in hand -> seconds of work left
    last: float = 0.0  # when `active` was last brought up to date
    version: int = 0  # its pending "done" event is stale once this moves on


@dataclass(eq=False)
class _Job:
    """A step in a replica's hands, on `slots` (indices of the replica's devices)."""

    request: _Request
    model: str
    replica: _Replica
    slots: list[int]
    left: int  # devices whose share of the step is not done yet
    home: int = 1  # the degree it was given; it shrinks below it and grows back (adaptive mode)
    riders: list[_Request] = field(default_factory=list)  # the batch's other requests
    started: float = 0.0
    wait_s: float = 0.0  # seconds it holds its replica beyond its compute (loads, remote ControlNets)

    @property
    def requests(self) -> list[_Request]:
        return [self.request, *self.riders]


@dataclass(eq=False)
class _Replica:
    """`size` devices (a group when > 1). `devices`: where its steps compute (the GPUs it is
    placed on; a group's own devices when compute is not limited; none for a lone replica then).
    `placed`: the GPUs holding its memory."""

    unit: str
    ready_at: float
    size: int = 1
    index: int = 0  # its place in start order: replicas take queued steps in this order
    alive: bool = True  # False once removed
    retiring: bool = False
    jobs: list[_Job] = field(default_factory=list)
    devices: list[_Gpu] = field(default_factory=list)
    placed: list[_Gpu] = field(default_factory=list)
    memory: int = 0
    share: float = 0.0  # the compute it was placed as committing on each of its GPUs
    loras: OrderedDict[str, None] = field(default_factory=OrderedDict)  # loaded, least recent first
    controlnets: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def free_slots(self) -> int:
        """Its devices none of its own steps uses."""
        return self.size - len({i for job in self.jobs for i in job.slots})


@dataclass
class Simulation:
    """`workflows`: name -> stages, each a list of model ids run in parallel, in order.
    `units`: unit -> the models its replicas host. `hop_s`: fixed overhead per stage (bus and
    tensor hops; 0 for an in-process pipeline). `gpus` > 0: that many GPUs of `gpu_memory_bytes`;
    a replica is placed by the autoscaler's rule (`services/autoscaler/placement.py`: the least
    compute committed among those that hold it; none: it is not started), and the steps its
    replicas run at once share its compute equally (time slicing:
    a text encoder's short step is slowed by a denoising loop beside it, not queued behind the
    whole loop). `gpus` = 0: compute is not limited, only the policy's budget.
    `group_size`: unit -> devices a replica owns (default 1; see the module docstring), its
    steps split as `parallel_mode` says (`shared.parallel_policy.MODES`). `slo_s`: workflow ->
    seconds a request has (its deadline, for the degree rule's rescue; none: no deadline).
    `measured_steps`: the step time the policy is given per model is, as `lego up`'s replicas
    report it, the mean wall time its steps took (a batch's over its steps) in the last
    `window_s` (before any: the profile's); else the profile's (see `_step_s`). `admissions`:
    the policy also sees, per model, the steps of the requests that arrived in the last
    `window_s` (as `lego up`'s gateways announce them), before those steps reach the model.
    `gpus_per_node`: GPUs sharing a host (its memory caches LoRA files). `controlnet_link`:
    where a ControlNet runs, None on its denoiser's device, else on another device reached over
    that link (see "ControlNets" in the module docstring). `route`: a trace request's workflow."""

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
    group_size: dict[str, int] = field(default_factory=dict)
    parallel_mode: str = "adaptive"
    slo_s: dict[str, float] = field(default_factory=dict)
    gpus_per_node: int = 8
    controlnet_link: Link | None = None
    route: Callable[[TracedRequest], str] = default_route
    batch_scan: int = 64  # queued steps a batch looks through for riders
    measured_steps: bool = False  # the policy sees steps' wall time, as replicas report it (below)
    admissions: bool = False  # the policy foresees each model's steps from the requests admitted (policy.py)
    sample_s: float = 0.0  # > 0: every so often, `samples` gets (time, GPUs holding a replica, replicas)
    # A request's deadline in seconds, by its index in the arrivals. With it, a request whose
    # models' queues already outlast its deadline is refused at arrival, by the gateway's rule
    # (services/gateway/overload.py: per model, steps queued, in hand or on their way in admitted
    # requests' earlier stages x the measured step time / ready replicas; the largest). A client
    # whose timeout is its SLO gets that. (One gateway: it sees every admitted request.)
    deadline_s: Callable[[int], float] | None = None
    # Steps one device runs at once at full speed (1: a GPU, its steps time-sliced), and how much
    # slower each runs while two or more do (a CPU's cores share caches and memory bandwidth:
    # bench/fidelity.py measures it). The replay of `lego up` on this box's cores uses both.
    cores_per_gpu: int = 1
    contention: float = 1.0

    def __post_init__(self) -> None:
        self.unit_of = {m: u for u, ms in self.units.items() for m in ms}
        self._unit_order = {u: i for i, u in enumerate(self.units)}
        missing = {m for stages in self.workflows.values() for s in stages for m in s} - set(self.unit_of)
        if missing:
            raise ValueError(f"models {sorted(missing)} are in no unit")
        bad = {u: k for u, k in self.group_size.items() if u not in self.units or k < 1}
        if bad:
            raise ValueError(f"group sizes {bad}: name units of this simulation, each 1 device or more")
        if self.cores_per_gpu < 1 or self.contention < 1.0:
            raise ValueError(f"cores_per_gpu {self.cores_per_gpu}, contention {self.contention}: need >= 1 each")
        if self.parallel_mode not in MODES:
            raise ValueError(f"parallel mode {self.parallel_mode!r}: use one of {', '.join(MODES)}")
        self.starts = 0  # replicas started by the policy (each a cold start)
        self.unplaced = 0  # replicas the policy wanted that no GPU had the memory for
        self.degrees: Counter[int] = Counter()  # steps started on a group, by the degree chosen
        self.degree_reasons: Counter[str] = Counter()  # ... and by why ("fair share", "deadline rescue", ...)
        self.batches: Counter[int] = Counter()  # calls run, by the steps batched in them
        self.loads: Counter[str] = Counter()  # adapter cache misses: "lora", "lora from disk", "controlnet"
        self.events = 0  # events processed by the last run
        self.samples: list[tuple[float, int, int]] = []  # the last run's, every `sample_s`
        self.refused = 0  # requests refused at arrival (`deadline_s`)

    def solo_latency(self, workflow: str) -> float:
        """What a request of `workflow` takes with the cluster to itself."""
        return sum(max(self.models[m].step_s for m in stage) + self.hop_s for stage in self.workflows[workflow])

    def run(self, arrivals: Iterable[tuple[float, str] | TracedRequest], until: float) -> list[RequestOutcome]:
        """Replay `arrivals`, each (time, workflow) or a trace request (`TracedRequest`: its
        workflow by `route`, its ControlNets and LoRAs); requests unfinished at `until` count as
        not finished."""
        self._reset()
        requests = sorted((self._request(i, a) for i, a in enumerate(arrivals)), key=lambda r: (r.arrived, r.workflow))
        for unit in self.units:
            for _ in range(self.start_replicas.get(unit, self.policy.limits_of(unit).min_replicas)):
                self._start(unit, ready_at=0.0)
        self._push(0.0, "tick", None)
        self.events = 0
        arriving = 0  # arrivals enter in order, before any other event of the same time
        while arriving < len(requests) or self._events:
            if arriving < len(requests) and (not self._events or requests[arriving].arrived <= self._events[0][0]):
                if requests[arriving].arrived > until:
                    break
                self._now = requests[arriving].arrived
                if self._refuses(requests[arriving]):
                    self.refused += 1
                else:
                    self._admit(requests[arriving])
                    self._enter_stage(requests[arriving])
                arriving += 1
                self.events += 1
                self._dispatch()
                continue
            if self._events[0][0] > until:
                break
            self._now, _, what, payload = heapq.heappop(self._events)
            self.events += 1
            if what == "done":
                assert isinstance(payload, _Job)
                self._finish_step(payload)
            elif what == "gpu":
                gpu, version = payload  # type: ignore[misc]
                self._gpu_event(gpu, version)
            elif what == "tick":
                self._tick()
                self._push(self._now + self.tick_s, "tick", None)
            self._dispatch()
        return [
            self._outcomes.get(id(r), RequestOutcome(r.workflow, r.arrived, None, r.degree, r.index)) for r in requests
        ]

    def _reset(self) -> None:
        """A run's state, from nothing: no replica, no queue, idle GPUs."""
        self._now = 0.0
        self.samples = []
        self.refused = 0
        self._seq = itertools.count()
        self._events: list[tuple[float, int, str, object]] = []
        self._queues: dict[str, deque[tuple[float, _Request]]] = {m: deque() for m in self.unit_of}
        self._by_unit: dict[str, dict[_Replica, None]] = {u: {} for u in self.units}  # in start order
        self._idle: dict[str, list[tuple[int, _Replica]]] = {u: [] for u in self.units}  # lone, ready, free
        self._grouped = [u for u in self.units if self.group_size.get(u, 1) > 1]
        # lone units whose steps queued or replicas free changed since the last dispatch (the
        # only ones where a free replica and a queued step can meet)
        self._waiting: dict[str, None] = {}
        self._loading: list[tuple[float, int, _Replica]] = []  # not yet ready, by when they will be
        self._in_hand: Counter[str] = Counter()  # steps of each model in replicas' hands
        self._upstream: Counter[str] = Counter()  # steps of admitted requests still in earlier stages
        # units `_active` may hold true for: those with a minimum, and any a step, an admission
        # or a replica touched since the last tick that found them idle
        self._maybe_active: set[str] = {u for u in self.units if self.policy.limits_of(u).min_replicas > 0}
        self._charged: dict[str, float] = dict.fromkeys(
            self.unit_of, 0.0
        )  # seconds its steps took (calls, loads), as a replica measures
        self._charged_steps: Counter[str] = Counter()
        self._walls: dict[str, deque[tuple[float, float]]] = {m: deque() for m in self.unit_of}  # (end, s a step)
        self._last_wall: dict[str, float] = {}
        self._started = itertools.count()
        self._gpus = [_Gpu(memory_free=self.gpu_memory_bytes, node=i // self.gpus_per_node) for i in range(self.gpus)]
        self._host_loras: dict[int, OrderedDict[str, None]] = {}  # node -> LoRA files in its memory
        self._arrived_steps: dict[str, deque[float]] = {m: deque() for m in self.unit_of}
        self._admitted_steps: dict[str, deque[float]] = {m: deque() for m in self.unit_of}  # foreseen at arrival
        self._scaler = ScalePolicy(self.policy)
        self._outcomes: dict[int, RequestOutcome] = {}

    # -- requests ---------------------------------------------------------------------------
    def _request(self, index: int, arrival: tuple[float, str] | TracedRequest) -> _Request:
        if isinstance(arrival, tuple):
            return _Request(workflow=arrival[1], arrived=arrival[0], index=index)
        workflow = self.route(arrival)
        if workflow not in self.workflows:
            raise ValueError(f"trace request at {arrival.timestamp:g} s: no workflow {workflow!r} in this simulation")
        return _Request(
            workflow=workflow,
            arrived=arrival.timestamp,
            controlnets=tuple(arrival.controlnets),
            loras=tuple(arrival.loras),
            index=index,
        )

    def _push(self, at: float, what: str, payload: object) -> None:
        heapq.heappush(self._events, (at, next(self._seq), what, payload))

    def _refuses(self, request: _Request) -> bool:
        """The gateway's overload rule (see `deadline_s`)."""
        if self.deadline_s is None:
            return False
        deadline = self.deadline_s(request.index)
        for stage in self.workflows[request.workflow]:
            for model in stage:
                unit = self.unit_of[model]
                ready = sum(1 for r in self._by_unit[unit] if r.ready_at <= self._now and not r.retiring)
                ahead = len(self._queues[model]) + self._in_hand[model] + self._upstream[model]
                if ready and ahead and ahead * self._step_s(model) / ready > deadline:
                    return True
        return False

    def _admit(self, request: _Request) -> None:
        """A request admitted: each of its workflow's steps is on its way (the gateway's overload
        rule counts them, `deadline_s`), and foreseen now (the policy's `expected_rate`) when
        `admissions` is on. A step stops being on its way when its stage starts."""
        for stage in self.workflows[request.workflow]:
            for model in stage:
                self._upstream[model] += 1
                if self.admissions:
                    self._admitted_steps[model].append(self._now)
                    self._maybe_active.add(self.unit_of[model])

    def _enter_stage(self, request: _Request) -> None:
        stage = self.workflows[request.workflow][request.stage]
        request.waiting_on = len(stage)
        for model in stage:
            self._upstream[model] -= 1
            self._maybe_active.add(self.unit_of[model])
            self._queues[model].append((self._now, request))
            if self.group_size.get(self.unit_of[model], 1) == 1:
                self._waiting[self.unit_of[model]] = None
            self._arrived_steps[model].append(self._now)

    def _finish_step(self, job: _Job) -> None:
        replica = job.replica
        replica.jobs.remove(job)
        self._in_hand[job.model] -= 1 + len(job.riders)
        if self.measured_steps:
            self._walls[job.model].append((self._now, (self._now - job.started) / (1 + len(job.riders))))
        if replica.retiring and not replica.jobs:
            self._remove(replica)
        elif replica.ready_at <= self._now:
            self._make_idle(replica)
        for request in job.requests:
            self._step_done(request)

    def _step_done(self, request: _Request) -> None:
        request.waiting_on -= 1
        if request.waiting_on:
            return
        request.stage += 1
        if request.stage == len(self.workflows[request.workflow]):
            latency = self._now - request.arrived
            self._outcomes[id(request)] = RequestOutcome(
                request.workflow, request.arrived, latency, request.degree, request.index
            )
        else:
            self._enter_stage(request)

    def _dispatch(self) -> None:
        """Every ready replica, in start order, takes the oldest steps queued for its unit's
        models, one for each of its devices none of its steps uses (a lone replica: one step
        when it is idle).

        Why not a loop over every replica: at 1,000 GPUs that loop ran on every event. A lone
        replica only acts when idle and its unit has steps queued, so only the first such idle
        replicas of each unit are visited (the queue's length of them, from a heap in start
        order); groups, which also shrink and grow their split steps, are visited as before.
        The order across units is kept (start order), so outcomes are the same as the loop's."""
        while self._loading and self._loading[0][0] <= self._now:
            _, _, replica = heapq.heappop(self._loading)
            self._make_idle(replica)
        chosen: list[_Replica] = []
        for unit in self._grouped:
            chosen.extend(r for r in self._by_unit[unit] if not r.retiring and r.ready_at <= self._now)
        waiting, self._waiting = self._waiting, {}
        for unit in waiting:
            queued = sum(len(self._queues[m]) for m in self.units[unit])
            idle = self._idle[unit]
            while queued and idle:
                _, replica = heapq.heappop(idle)
                if replica.alive and not replica.retiring and not replica.jobs:
                    chosen.append(replica)
                    queued -= 1
        if len(chosen) > 1:
            chosen.sort(key=lambda r: r.index)
        for replica in chosen:
            self._serve(replica)

    def _make_idle(self, replica: _Replica) -> None:
        """A lone replica ready and free goes on its unit's idle heap (a group is always visited)."""
        if replica.size == 1 and replica.alive and not replica.retiring and not replica.jobs:
            heapq.heappush(self._idle[replica.unit], (replica.index, replica))
            self._waiting[replica.unit] = None

    def _serve(self, replica: _Replica) -> None:
        adapts = self.parallel_mode == "adaptive" and replica.size > 1
        queued = sum(len(self._queues[m]) for m in self.units[replica.unit])
        if adapts and queued and not replica.free_slots():
            self._shrink(replica, queued)
        taken: list[tuple[_Request, str]] = []
        for _ in range(replica.free_slots()):
            step = self._next_step(replica.unit)
            if step is None:
                break
            taken.append(step)
        held = len(replica.jobs) + len(taken)
        for request, model in taken:
            riders = self._riders(request, model) if replica.size == 1 else []
            self._start_step(replica, request, model, busy=held - 1, riders=riders)
        if (
            adapts
            and replica.free_slots()
            and replica.jobs
            and not any(self._queues[m] for m in self.units[replica.unit])
        ):
            self._grow(replica)

    def _next_step(self, unit: str) -> tuple[_Request, str] | None:
        queued = [(self._queues[m][0][0], m) for m in self.units[unit] if self._queues[m]]
        if not queued:
            return None
        _, model = min(queued)
        _, request = self._queues[model].popleft()
        return request, model

    def _riders(self, request: _Request, model: str) -> list[_Request]:
        """Queued steps of `model` that can share the call `request` leads: the same ControlNets
        and LoRAs (the denoiser's batch engine rule), up to the model's batch, the oldest first
        among the first `batch_scan` queued."""
        room = self.models[model].max_batch - 1
        queue = self._queues[model]
        if room <= 0 or not queue:
            return []
        riders: list[_Request] = []
        keep: list[tuple[float, _Request]] = []
        for _ in range(min(len(queue), self.batch_scan)):
            item = queue.popleft()
            other = item[1]
            if len(riders) < room and other.controlnets == request.controlnets and other.loras == request.loras:
                riders.append(other)
            else:
                keep.append(item)
        queue.extendleft(reversed(keep))
        return riders

    def _start_step(
        self, replica: _Replica, request: _Request, model: str, busy: int, riders: list[_Request] | None = None
    ) -> None:
        """The step on the replica's least used devices, as many as its degree (a batch: the
        leading request's step with its riders', in one call)."""
        degree = self._degree(replica, request, model, busy) if replica.size > 1 else 1
        used = Counter(i for job in replica.jobs for i in job.slots)
        slots = sorted(range(replica.size), key=lambda i: (used[i], i))[:degree]
        job = _Job(
            request, model, replica, slots, left=len(slots), home=len(slots), riders=riders or [], started=self._now
        )
        replica.jobs.append(job)
        self._in_hand[model] += 1 + len(job.riders)
        self.batches[1 + len(job.riders)] += 1
        request.degree = max(request.degree, degree)
        work = (
            self._work_s(model, degree)
            if not job.riders
            else self.models[model].batch_s(1 + len(job.riders)) + self.hop_s
        )
        compute_s, job.wait_s = self._adapter_s(replica, request, model)
        work += compute_s
        self._charged[model] += work + job.wait_s
        self._charged_steps[model] += 1 + len(job.riders)
        if not replica.devices:
            self._push(self._now + work + job.wait_s, "done", job)
            return
        for i in slots:
            gpu = replica.devices[i]
            self._advance(gpu)
            gpu.active[job] = work
            self._reschedule(gpu)

    def _adapter_s(self, replica: _Replica, request: _Request, model: str) -> tuple[float, float]:
        """What the request's ControlNets and LoRAs add to its step on this replica: (compute on
        its device, seconds it holds the replica besides). Loads are paid at cache misses, and
        the caches updated (least recently used first out)."""
        adapters = self.models[model].adapters
        if adapters is None or not (request.controlnets or request.loras):
            return 0.0, 0.0
        compute, wait = 0.0, 0.0
        node = replica.placed[0].node if replica.placed else 0
        host = self._host_loras.setdefault(node, OrderedDict())
        for lora in request.loras:
            full = len(replica.loras) >= adapters.lora_slots
            if _touch(replica.loras, lora, adapters.lora_slots):
                continue
            wait += adapters.lora_swap_s if full and adapters.lora_swap_s else adapters.lora_load_s
            self.loads["lora"] += 1
            if not _touch(host, lora, adapters.host_lora_slots):
                wait += adapters.lora_disk_s
                self.loads["lora from disk"] += 1
        if request.controlnets and self.controlnet_link is None:  # on the denoiser's device
            for controlnet in request.controlnets:
                compute += adapters.controlnet_s
                if not _touch(replica.controlnets, controlnet, adapters.controlnet_slots):
                    wait += adapters.controlnet_load_s
                    self.loads["controlnet"] += 1
        elif request.controlnets:  # on other devices, side by side; their residuals cross the link every step
            link, n = self.controlnet_link, len(request.controlnets)
            assert link is not None
            per_step = link.transfer_s(n * adapters.residual_bytes)
            wait += adapters.controlnet_s + adapters.steps * per_step
        return compute, wait

    def _work_s(self, model: str, degree: int) -> float:
        profile = self.models[model]
        return (profile.step_s if degree == 1 else profile.degree_s[degree]) + self.hop_s

    def _shrink(self, replica: _Replica, queued: int) -> None:
        """Steps wait for a group with no device free: its split steps shrink to the fair share
        of the requests it would hold with them."""
        fair = degree_at_most(replica.size // (len(replica.jobs) + min(queued, replica.size)))
        for job in replica.jobs:
            if job.left and len(job.slots) > fair:  # (left 0: computed, waiting out its loads)
                self._resize(job, job.slots[:fair])

    def _grow(self, replica: _Replica) -> None:
        """Devices idle, nothing queued: shrunk steps take back what their first degree, the fair
        share and the idle devices allow."""
        fair = degree_at_most(replica.size // len(replica.jobs))
        for job in replica.jobs:
            if not job.left:  # computed, waiting out its loads
                continue
            used = {i for other in replica.jobs for i in other.slots}
            free = [i for i in range(replica.size) if i not in used]
            wider = [
                d
                for d in (4, 2)
                if len(job.slots) < d <= min(job.home, fair)
                and d - len(job.slots) <= len(free)
                and d in self.models[job.model].degree_s
            ]
            if wider:
                self._resize(job, job.slots + free[: wider[0] - len(job.slots)])

    def _resize(self, job: _Job, slots: list[int]) -> None:
        """Move a split step onto `slots`: the fraction of its work left, at the new degree's time."""
        devices = job.replica.devices
        touched = {id(devices[i]): devices[i] for i in job.slots + slots}
        for gpu in touched.values():
            self._advance(gpu)
        left = [devices[i].active[job] for i in job.slots if job in devices[i].active]
        fraction = max(left) / self._work_s(job.model, len(job.slots))
        for i in job.slots:
            devices[i].active.pop(job, None)
        work = fraction * self._work_s(job.model, len(slots))
        for i in slots:
            devices[i].active[job] = work
        job.slots, job.left = slots, len(slots)
        for gpu in touched.values():
            self._reschedule(gpu)

    def _degree(self, replica: _Replica, request: _Request, model: str, busy: int) -> int:
        """The denoiser groups' own rule, given what this group holds and the request's slack."""
        profile = self.models[model]
        step_s = {1: profile.step_s, **profile.degree_s}
        inputs = DegreeInputs(
            group_size=replica.size,
            allowed=tuple(sorted(step_s)),
            busy=busy,
            slack_s=self._slack_s(request),
            steps=1,  # a simulated step is the model's whole run (a denoising loop's steps included)
            step_s=step_s,
        )
        choice = choose_degree(inputs, self.parallel_mode)
        self.degrees[choice.degree] += 1
        self.degree_reasons[choice.reason.split(":")[0]] += 1
        return choice.degree

    def _slack_s(self, request: _Request) -> float | None:
        """Seconds to its deadline, less what its later stages take alone."""
        slo = self.slo_s.get(request.workflow)
        if slo is None:
            return None
        later = self.workflows[request.workflow][request.stage + 1 :]
        rest = sum(max(self.models[m].step_s for m in stage) + self.hop_s for stage in later)
        return request.arrived + slo - self._now - rest

    def _speed(self, steps: int) -> float:
        """How fast each of `steps` steps on one device runs, alone = 1: its `cores_per_gpu`
        run at once, slowed by `contention` when two or more do; more share them in time."""
        running = min(steps, self.cores_per_gpu)
        return running / steps / (self.contention if running > 1 else 1.0)

    def _advance(self, gpu: _Gpu) -> None:
        """Bring the work left of the GPU's steps up to now (each ran at `_speed`)."""
        if gpu.active:
            share = (self._now - gpu.last) * self._speed(len(gpu.active))
            for replica in gpu.active:
                gpu.active[replica] -= share
        gpu.last = self._now

    def _reschedule(self, gpu: _Gpu) -> None:
        gpu.version += 1
        if gpu.active:
            left = min(gpu.active.values())
            self._push(self._now + max(0.0, left) / self._speed(len(gpu.active)), "gpu", (gpu, gpu.version))

    def _gpu_event(self, gpu: _Gpu, version: int) -> None:
        if version != gpu.version:
            return  # the GPU's set of steps changed since: a newer event stands
        self._advance(gpu)
        finished = [job for job, left in gpu.active.items() if left <= 1e-9]
        for job in finished:
            del gpu.active[job]
        self._reschedule(gpu)
        for job in finished:
            job.left -= 1
            if not job.left:  # its last device is done
                if job.wait_s > 0:
                    self._push(self._now + job.wait_s, "done", job)
                else:
                    self._finish_step(job)

    # -- scaling ----------------------------------------------------------------------------
    def _signal(self, unit: str) -> UnitSignal:
        """A group of k devices counts k replicas' memory, and serves k steps side by side: a
        step costs it 1/k of its time (the policy's load and work are in replicas' seconds)."""
        mine = [r for r in self._by_unit[unit] if not r.retiring]
        size = self.group_size.get(unit, 1)
        return unit_signal(
            unit,
            len(mine),
            [self._load(model, size) for model in self.units[unit]],
            service_s=max(self._step_s(m) for m in self.units[unit]),
            memory_bytes=size * sum(self.models[m].memory_bytes for m in self.units[unit]),
            device="cluster",
        )

    def _load(self, model: str, size: int = 1) -> ConsumerLoad:
        """A model's queue as the autoscaler would observe it: steps queued or in hand, and the
        arrivals of the last `window_s` seconds."""
        times, admitted = self._arrived_steps[model], self._admitted_steps[model]
        for seen in (times, admitted):
            while seen and seen[0] < self._now - self.window_s:
                seen.popleft()
        return ConsumerLoad(
            backlog=len(self._queues[model]) + self._in_hand[model],
            arrival_rate=len(times) / self.window_s,
            step_s=self._step_s(model) / size,
            expected_rate=len(admitted) / self.window_s,
        )

    def _step_s(self, model: str) -> float:
        """Seconds a step of `model` takes as the policy is told: with `measured_steps`, the mean
        wall time of its steps that ended in the last `window_s` (time slicing, loads and
        batches included; the last such mean while none ended; the profile's before any);
        else its profile's, or where ControlNets, LoRAs or batches change that, the mean so far
        of what its calls and loads took."""
        profile = self.models[model]
        if self.measured_steps:
            walls = self._walls[model]
            while walls and walls[0][0] < self._now - self.window_s:
                walls.popleft()
            if walls:
                self._last_wall[model] = sum(w for _, w in walls) / len(walls)
            return self._last_wall.get(model, profile.step_s)
        if (profile.adapters is None and profile.max_batch == 1) or not self._charged_steps[model]:
            return profile.step_s
        return self._charged[model] / self._charged_steps[model]

    def _sample(self) -> None:
        if self.sample_s > 0 and (not self.samples or self._now >= self.samples[-1][0] + self.sample_s):
            used = sum(1 for g in self._gpus if g.memory_free < self.gpu_memory_bytes)
            self.samples.append((self._now, used, sum(len(r) for r in self._by_unit.values())))

    def _tick(self) -> None:
        self._sample()
        # the units that may be active, in `units` order (a trace with tens of thousands of
        # units, one per pipeline, is ticked in the time of the few it uses)
        active = [u for u in sorted(self._maybe_active, key=self._unit_order.__getitem__) if self._active(u)]
        self._maybe_active = set(active)
        signals = [self._signal(u) for u in active]
        decisions = self._scaler.decide(signals, self._now)
        ups: list[tuple[str, int]] = []
        for decision in decisions:  # downs first: they free the memory the ups may need
            mine = [r for r in self._by_unit[decision.unit] if not r.retiring]
            if decision.target > len(mine):
                ups.append((decision.unit, decision.target - len(mine)))
            elif decision.target < len(mine):
                # Still loading first, then idle ones, then busy ones (they finish their step).
                mine.sort(key=lambda r: (r.ready_at <= self._now, bool(r.jobs)))
                for replica in mine[: len(mine) - decision.target]:
                    if not replica.jobs:
                        self._remove(replica)
                    else:
                        replica.retiring = True
        loads = {s.unit: s.load for s in signals}
        for unit, count in ups:
            load_s = max(self.models[m].load_s for m in self.units[unit])
            share = share_of(loads[unit], sum(1 for r in self._by_unit[unit] if not r.retiring) + count)
            for _ in range(count):
                if self._start(unit, ready_at=self._now + load_s, share=share):
                    self.starts += 1
                else:
                    self.unplaced += 1

    def _active(self, unit: str) -> bool:
        """Whether the policy could decide anything for the unit: it runs replicas, has steps
        queued or in hand or recent arrivals, or a minimum. (The policy would keep an idle unit
        of no replicas and no minimum at 0; leaving it out changes no decision, and a trace with
        thousands of units, one per pipeline, is decided in the time of the few it uses.)"""
        if self._by_unit[unit] or self.policy.limits_of(unit).min_replicas > 0:
            return True
        for model in self.units[unit]:
            times, admitted = self._arrived_steps[model], self._admitted_steps[model]
            for seen in (times, admitted):
                while seen and seen[0] < self._now - self.window_s:
                    seen.popleft()
            if times or admitted or self._queues[model] or self._in_hand[model]:
                return True
        return False

    def _start(self, unit: str, ready_at: float, share: float = MIN_SHARE) -> bool:
        """A new replica of `unit` committing `share` of a GPU's compute, placed by the
        autoscaler's rule (`services/autoscaler/placement.py`: the least compute committed among
        the GPUs that hold it, ties to the fullest); a group of k: on k such GPUs, one at a time."""
        size = self.group_size.get(unit, 1)
        memory = sum(self.models[m].memory_bytes for m in self.units[unit])
        placed: list[_Gpu] = []
        if self._gpus:
            free = [g for g in self._gpus if g.memory_free >= memory]
            for _ in range(size):
                i = choose_device(free, memory)
                if i is None:
                    return False
                placed.append(free.pop(i))
            for gpu in placed:
                gpu.memory_free -= memory
                gpu.committed += share
        devices = placed or [_Gpu(memory_free=0) for _ in range(size if size > 1 else 0)]
        replica = _Replica(
            unit=unit,
            ready_at=ready_at,
            size=size,
            index=next(self._started),
            devices=devices,
            placed=placed,
            memory=memory,
            share=share,
        )
        self._by_unit[unit][replica] = None
        self._maybe_active.add(unit)
        heapq.heappush(self._loading, (ready_at, replica.index, replica))
        return True

    def _remove(self, replica: _Replica) -> None:
        """Only an idle replica goes (a busy one retires after its steps)."""
        del self._by_unit[replica.unit][replica]
        replica.alive = False
        for gpu in replica.placed:
            gpu.memory_free += replica.memory
            gpu.committed -= replica.share

    def replicas_now(self) -> dict[str, int]:
        return {u: sum(1 for r in self._by_unit[u] if not r.retiring) for u in self.units}

    def placements(self) -> dict[str, list[tuple[int, ...]]]:
        """Per unit, the GPUs (indexes) holding each live replica's memory: where it was put."""
        index = {id(gpu): i for i, gpu in enumerate(self._gpus)}
        return {
            u: [tuple(index[id(g)] for g in r.placed) for r in self._by_unit[u] if not r.retiring] for u in self.units
        }


def _touch(cache: OrderedDict[str, None], key: str, slots: int) -> bool:
    """Whether `key` was in the LRU cache; either way it is now its most recent entry (the least
    recent ones beyond `slots` dropped)."""
    hit = key in cache
    if hit:
        cache.move_to_end(key)
    else:
        cache[key] = None
        while len(cache) > max(slots, 0):
            cache.popitem(last=False)
    return hit


def attainment(outcomes: list[RequestOutcome], slo_s: dict[str, float]) -> float:
    """Fraction of requests finished within their workflow's SLO (unfinished ones miss it)."""
    if not outcomes:
        return math.nan
    met = sum(1 for o in outcomes if o.latency_s is not None and o.latency_s <= slo_s[o.workflow])
    return met / len(outcomes)
