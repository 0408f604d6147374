"""How many replicas each unit should run: a pure function of what was observed, plus the
cooldown memory of when each unit started wanting fewer. No I/O here; `tests/unit` drives it.

A unit is one kind of process (it hosts one or more models); its replicas take steps from the
consumers of its models. Per unit, with its consumers' numbers added up:

    load     = sum over its models of arrival_rate x seconds_per_item   (busy replica-seconds per second)
    arrival_rate = the steps that reached its consumers, or those the requests the gateways admitted
               will bring (their workflows' steps of the model), whichever is higher
    work     = sum over its models of backlog x seconds_per_item          (seconds of queued work)
    drain    = the SLO in seconds, or for an SLO of k x the solo latency: (k - 1) x the slowest
               unit's seconds_per_item (the denoising loop: what a request's solo latency is made of)
    desired  = ceil(load / target_utilisation + work / drain)

Why the admitted requests: a model late in a workflow sees its steps only once the stages before
it are done, so at a rise in load it would scale a cold start late, behind the text encoders'
own scale-up (in the 1,000-GPU simulation the SDXL denoiser scaled 20-30 s after its requests
were admitted). A request admitted now is a step of each of its models within seconds.

The first term keeps up with arrivals at the target utilisation; the second drains what is
queued while the request still has slack: a request may wait (k - 1) x its solo latency in all.
Taking the slowest stage's step time as the solo latency keeps a fast stage (a text encoder
at a few ms a step) from scaling on a long but quickly drained queue. A model whose step time
no replica has measured yet (no step done) counts `default_service_s` a step (default 0: only
"a backlog asks for one replica" applies until the first step is measured, a second or two).

Then: up at once; down only after the unit wanted fewer for `cooldown_s` without a break, to
the most it wanted in that time (the next step down waits a full cooldown again); clamped to
[min, max]; and the replicas of one device fit its memory budget, given out in this order:
every unit's minimum, a first replica to every unit with work, the replicas each unit already
runs and still wants, scale-ups (most loaded per replica first, one at a time), then replicas
kept only by the cooldown. A replica that does not fit is not started, and a replica kept only
by the cooldown is stopped at once when another unit needs its memory.

The other rule the autoscaler owns, how a denoiser group of k devices splits each request
(`choose_degree`: fair share of the group, a deadline rescue), is re-exported here beside the
scaling rule; it lives in `shared/parallel_policy.py` because the denoiser service calls it at
each request's first step and a service never imports another service. The simulator uses the
very same function for its groups.
"""

from __future__ import annotations

import heapq
import math
import re
from dataclasses import dataclass, field

from shared.parallel_policy import MODES, DegreeChoice, DegreeInputs, choose_degree, degree_at_most

__all__ = [
    "MODES",
    "ConsumerLoad",
    "Decision",
    "DegreeChoice",
    "DegreeInputs",
    "Limits",
    "PolicyConfig",
    "ScalePolicy",
    "Slo",
    "UnitSignal",
    "choose_degree",
    "degree_at_most",
    "desired_replicas",
    "parse_limits",
    "solo_latency",
    "unit_signal",
]


@dataclass(frozen=True)
class Slo:
    """Latency objective: `factor` x the solo latency, or an absolute number of `seconds`."""

    factor: float | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str) -> Slo:
        """'5x' (5 times the solo latency), '12s' or '12' (seconds)."""
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(x|s)?\s*", text or "")
        if not m or float(m.group(1)) <= 0:
            raise ValueError(f"SLO {text!r}: use e.g. '5x' (times the solo latency) or '12s' (seconds)")
        value = float(m.group(1))
        if m.group(2) == "x":
            if value <= 1:
                raise ValueError(f"SLO {text!r}: a multiple of the solo latency must be above 1")
            return cls(factor=value)
        return cls(seconds=value)

    def drain_s(self, solo_s: float) -> float:
        """How long a unit may take to work off its queue, given the solo latency."""
        if self.seconds is not None:
            return self.seconds
        return ((self.factor or 5.0) - 1.0) * solo_s

    def __str__(self) -> str:
        return f"{self.factor:g}x solo latency" if self.factor is not None else f"{self.seconds:g}s"


@dataclass(frozen=True)
class Limits:
    min_replicas: int = 1
    max_replicas: int = 3

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"limits min={self.min_replicas} max={self.max_replicas}: need 0 <= min <= max, max >= 1")


def parse_limits(text: str, default: int) -> tuple[int, dict[str, int]]:
    """'3' -> (3, {}); '1,sd3-transformer=2' -> (1, {'sd3-transformer': 2}). Items are N or UNIT=N."""
    base, per_unit = default, {}
    for item in (i.strip() for i in (text or "").split(",")):
        if not item:
            continue
        name, sep, count = item.rpartition("=")
        if not count.isdigit():
            raise ValueError(f"replica limit {item!r}: use N or UNIT=N")
        if sep:
            per_unit[name] = int(count)
        else:
            base = int(count)
    return base, per_unit


@dataclass(frozen=True)
class PolicyConfig:
    slo: Slo = field(default_factory=lambda: Slo(factor=5.0))
    utilisation: float = 0.7
    cooldown_s: float = 30.0
    memory_budget_bytes: int = 0  # per device; 0: no limit
    default_service_s: float = 0.0  # seconds per step of a model no replica has measured yet
    default_limits: Limits = field(default_factory=Limits)
    limits: dict[str, Limits] = field(default_factory=dict)
    # Warm pool: the share of each device's memory budget kept filled with replicas the load does
    # not ask for, given to the units by their load (`_warm`); 0: off
    warm_fill: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.warm_fill <= 1.0:
            raise ValueError(f"warm fill {self.warm_fill}: a share of the memory budget, 0 (off) to 1")

    def limits_of(self, unit: str) -> Limits:
        return self.limits.get(unit, self.default_limits)


@dataclass(frozen=True)
class UnitSignal:
    """What was observed of one unit, its consumers added up."""

    unit: str
    current: int  # replicas the actuator runs (starting ones included)
    backlog: int = 0  # steps pending or in hand
    work_s: float = 0.0  # seconds of work those steps are
    load: float = 0.0  # busy replica-seconds per second the arrivals bring
    arrival_rate: float = 0.0  # steps per second
    service_s: float = 0.0  # measured mean seconds per step (0: none measured yet)
    memory_bytes: int = 0  # one replica's memory (0: not known yet, counts as free)
    device: str = "cpu"


@dataclass(frozen=True)
class ConsumerLoad:
    """One (kind, model) consumer of a unit as observed: steps queued or in hand, arrivals per
    second, seconds a step takes, and the steps per second of it that the requests admitted
    lately will bring (0: not known)."""

    backlog: int
    arrival_rate: float
    step_s: float
    expected_rate: float = 0.0

    @property
    def rate(self) -> float:
        """The arrivals the policy plans for: seen, or foreseen from admissions if higher."""
        return max(self.arrival_rate, self.expected_rate)


def unit_signal(unit: str, current: int, consumers: list[ConsumerLoad], **facts: object) -> UnitSignal:
    """A unit's signal, its consumers added up as the module docstring says (work = backlog x
    step time, load = arrivals x step time); `facts` are the rest of `UnitSignal`'s fields."""
    return UnitSignal(
        unit=unit,
        current=current,
        backlog=sum(c.backlog for c in consumers),
        work_s=sum(c.backlog * c.step_s for c in consumers),
        load=sum(c.rate * c.step_s for c in consumers),
        arrival_rate=sum(c.rate for c in consumers),
        **facts,  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class Decision:
    unit: str
    current: int
    desired: int  # what the load asks for, clamped to [min, max]
    target: int  # what to run: after cooldown and the memory budget
    reason: str

    @property
    def changed(self) -> bool:
        return self.target != self.current


def solo_latency(signals: list[UnitSignal], config: PolicyConfig) -> float:
    """The slowest measured step time: the bulk of a request's latency when it runs alone."""
    return max((s.service_s for s in signals if s.service_s > 0), default=config.default_service_s or 1.0)


def desired_replicas(signal: UnitSignal, config: PolicyConfig, solo_s: float) -> tuple[int, float, str]:
    """The replicas the load asks for (before limits), the unrounded figure, and the arithmetic."""
    rate_term = signal.load / config.utilisation
    drain = config.slo.drain_s(solo_s)
    backlog_term = signal.work_s / drain if drain > 0 else float(signal.backlog)
    raw = rate_term + backlog_term
    wanted = math.ceil(raw - 1e-9)
    if signal.backlog > 0:
        wanted = max(wanted, 1)
    why = (
        f"{signal.arrival_rate:.2f}/s x {signal.service_s or config.default_service_s:.3f}s"
        f" / {config.utilisation:g} = {rate_term:.2f}"
        f" + backlog {signal.backlog} ({signal.work_s:.2f}s of work) / {drain:.2f}s = {backlog_term:.2f}"
        f" -> {wanted}"
    )
    return wanted, raw, why


@dataclass
class _Below:
    since: float
    peak: int


@dataclass
class _Wants:
    """Per unit, what `decide` worked out before the memory budget: the clamped desire, what
    the cooldown holds on to, the unrounded desire (how pressed a unit is), and the reason."""

    wants: dict[str, int] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)
    raw: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)


class ScalePolicy:
    """Decides every unit's target each tick; remembers only the cooldown state."""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self._below: dict[str, _Below] = {}

    def decide(self, signals: list[UnitSignal], now: float) -> list[Decision]:
        asked = _Wants()
        solo_s = solo_latency(signals, self.config)
        for s in signals:
            limits = self.config.limits_of(s.unit)
            wanted, asked.raw[s.unit], why = desired_replicas(s, self.config, solo_s)
            want = min(max(wanted, limits.min_replicas), limits.max_replicas)
            if want != wanted:
                why += f"; clamped to [{limits.min_replicas}, {limits.max_replicas}] -> {want}"
            asked.wants[s.unit] = want
            asked.reasons[s.unit] = why
        warm = self._warm(signals, asked.wants)
        for s in signals:
            limits = self.config.limits_of(s.unit)
            want, why = asked.wants[s.unit], asked.reasons[s.unit]
            if warm.get(s.unit):
                why += f"; + {warm[s.unit]} warm (its load's share of the free budget)"
                want = min(want + warm[s.unit], limits.max_replicas)
            keep, note = self._cooldown(s.unit, s.current, want, now)
            asked.held[s.unit] = min(keep, limits.max_replicas)  # a lowered max applies at once
            asked.reasons[s.unit] = why + note
        targets = self._fit_memory(signals, asked)
        return [
            Decision(
                unit=s.unit,
                current=s.current,
                desired=asked.wants[s.unit],
                target=targets[s.unit],
                reason=asked.reasons[s.unit],
            )
            for s in signals
        ]

    def _warm(self, signals: list[UnitSignal], wants: dict[str, int]) -> dict[str, int]:
        """Warm replicas per unit: `warm_fill` of each device's budget, less what the wanted
        replicas take, shared by the units with load in proportion to it (the popular ones get
        most), whole replicas only.

        Why: a burst is over before a cold start ends (20-90 s on a GPU), so it is served by the
        replicas already up. Memory the load leaves free costs nothing to fill, and replicas
        kept only warm are granted last and give their memory up first (`_fit_device`). In the
        64-GPU simulation a warm fill of 0.8 took the mesh from 4x to 8x bursts survived at
        SLO 5x (docs/cluster-simulation.md)."""
        fill, budget = self.config.warm_fill, self.config.memory_budget_bytes
        if fill <= 0 or budget <= 0:
            return {}
        warm: dict[str, int] = {}
        for device in {s.device for s in signals}:
            group = [s for s in signals if s.device == device and s.memory_bytes > 0]
            spare = fill * budget - sum(wants[s.unit] * s.memory_bytes for s in group)
            loaded = [s for s in group if s.load > 0]
            total = sum(s.load for s in loaded)
            for s in loaded if spare > 0 else []:
                warm[s.unit] = int(spare * s.load / total // s.memory_bytes)
        return warm

    def _cooldown(self, unit: str, current: int, want: int, now: float) -> tuple[int, str]:
        """Up at once; down to the peak of the cooldown window once it has lasted `cooldown_s`."""
        if want >= current:
            self._below.pop(unit, None)
            return want, ""
        below = self._below.get(unit)
        if below is None:
            below = self._below[unit] = _Below(since=now, peak=want)
        below.peak = max(below.peak, want)
        waited = now - below.since
        if waited >= self.config.cooldown_s:
            # One step down per cooldown: the next one waits a full cooldown again.
            self._below[unit] = _Below(since=now, peak=want)
            return below.peak, f"; below {current} for {waited:.0f}s (cooldown {self.config.cooldown_s:g}s)"
        return current, f"; cooldown: keeps {current} for {self.config.cooldown_s - waited:.0f}s more"

    def _fit_memory(self, signals: list[UnitSignal], asked: _Wants) -> dict[str, int]:
        budget = self.config.memory_budget_bytes
        if budget <= 0:
            return dict(asked.held)
        targets: dict[str, int] = {}
        for device in sorted({s.device for s in signals}):
            group = [s for s in signals if s.device == device]
            targets.update(self._fit_device(group, asked, budget))
        return targets

    def _fit_device(self, group: list[UnitSignal], asked: _Wants, budget: int) -> dict[str, int]:
        """Replicas of one device's units within its budget, in the order the module docstring gives."""
        fit = _DeviceMemory(group, asked.held, budget)
        by_pressure = sorted(group, key=lambda s: -asked.raw[s.unit] / max(s.current, 1))
        for s in by_pressure:  # every unit's minimum (never refused: it is the operator's floor)
            fit.floor(s.unit, self.config.limits_of(s.unit).min_replicas)
        for s in by_pressure:  # a first replica for every unit with work
            if asked.wants[s.unit] >= 1:
                fit.grant(s.unit, 1)
        for s in by_pressure:  # what runs and is still wanted
            fit.grant(s.unit, min(s.current, asked.wants[s.unit]))
        # scale-ups, one replica at a time, most loaded per replica first (ties: the first in
        # `group`); a heap, as a cluster of thousands of units (a pipeline per adapter
        # combination, bench/cluster.py) made a scan per replica granted quadratic
        growing = [
            (-asked.raw[s.unit] / max(fit.alloc[s.unit], 1), i, s.unit)
            for i, s in enumerate(group)
            if asked.wants[s.unit] > fit.alloc[s.unit]
        ]
        heapq.heapify(growing)
        while growing:
            _, i, unit = heapq.heappop(growing)
            before = fit.alloc[unit]
            fit.grant(unit, before + 1)
            if fit.alloc[unit] != before and fit.alloc[unit] < asked.wants[unit]:
                heapq.heappush(growing, (-asked.raw[unit] / max(fit.alloc[unit], 1), i, unit))
        for s in by_pressure:  # kept only by the cooldown, if room is left
            fit.grant(s.unit, asked.held[s.unit])
        fit.explain(group, asked.reasons)
        return fit.alloc


class _DeviceMemory:
    """One device's memory budget, given out a replica at a time; remembers the units refused
    a replica they run or hold, to say so in their reason."""

    def __init__(self, group: list[UnitSignal], held: dict[str, int], budget: int) -> None:
        self.alloc = {s.unit: 0 for s in group}
        self.mem = {s.unit: s.memory_bytes for s in group}
        self.held = held
        self.budget = budget
        self.used = 0
        self.denied: set[str] = set()

    def floor(self, unit: str, replicas: int) -> None:
        """The operator's minimum, counted against the budget but never refused."""
        self.alloc[unit] = replicas
        self.used += replicas * self.mem[unit]

    def grant(self, unit: str, upto: int) -> None:
        """Replicas up to `upto` while they fit (a replica of unknown memory always fits)."""
        while self.alloc[unit] < upto:
            if self.used + self.mem[unit] > self.budget and self.mem[unit] > 0:
                if self.alloc[unit] < self.held[unit]:
                    self.denied.add(unit)
                return
            self.alloc[unit] += 1
            self.used += self.mem[unit]

    def explain(self, group: list[UnitSignal], reasons: dict[str, str]) -> None:
        gib = 2**30
        for s in group:
            if s.unit in self.denied and self.alloc[s.unit] < self.held[s.unit]:
                reasons[s.unit] += (
                    f"; memory budget ({self.used / gib:.2f} of {self.budget / gib:.2f} GiB on {s.device},"
                    f" {self.mem[s.unit] / gib:.2f} GiB a replica) -> {self.alloc[s.unit]}"
                )
