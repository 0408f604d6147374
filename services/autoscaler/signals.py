"""What the autoscaler observes each tick, turned into one `UnitSignal` per unit.

- Backlog: every step consumer's `num_pending + num_ack_pending` (as KEDA's NATS JetStream
  scaler counts it), one JetStream request for all consumers.
- Arrival rate: `pending + delivered` of a consumer only grows with arrivals (a redelivery
  counts as one: it is work too); its rise over the last `window_s` seconds is the rate.
- Admissions: each request a gateway admits is announced with the (kind, model) of the steps
  it will publish (`Bus.publish_admitted`, core NATS); their count's rise over the window is
  each consumer's `expected_rate`, which the policy plans for while the steps are still in the
  stages before (`listen` subscribes; without it, or with no gateway announcing, it is 0).
- Seconds per step, memory, device: the replicas' heartbeats in the presence bucket (a
  replica announces each model it hosts; one process, one replica id). A denoiser replica that
  is a parallel group of k devices (services/denoiser/group/) announces from its leader
  process, one model copy of the k it holds: its memory is k times that (`group_sizes`).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from services.autoscaler.policy import ConsumerLoad, PolicyConfig, UnitSignal, unit_signal
from shared.bus import Bus, ConsumerCounters
from shared.messages import ReplicaInfo
from shared.presence import live_replicas

Consumer = tuple[str, str]  # (kind, model_id)


@dataclass
class Observation:
    """One unit as seen this tick: the policy's input and what the status page shows."""

    signal: UnitSignal
    models: tuple[str, ...]
    live: int  # replicas announcing themselves
    consumers: list[ConsumerCounters] = field(default_factory=list)


class RateMeter:
    """Rate of change of a monotone counter over a sliding window; restarts if it goes down."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, value: int) -> float:
        if self._samples and value < self._samples[-1][1]:
            self._samples.clear()  # the consumer was recreated
        self._samples.append((now, value))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()
        t0, v0 = self._samples[0]
        return (value - v0) / (now - t0) if now - t0 > 0 else 0.0


class Observer:
    """Samples the bus and the presence bucket; keeps rate windows and last-known figures."""

    def __init__(
        self,
        bus: Bus,
        window_s: float = 10.0,
        default_service_s: float = 0.0,
        memory_per_replica: dict[str, int] | None = None,
        group_sizes: dict[str, int] | None = None,
    ) -> None:
        self.bus = bus
        self.window_s = window_s
        self.default_service_s = default_service_s
        self.memory_per_replica = dict(memory_per_replica or {})  # unit -> bytes, overrides heartbeats
        self.group_sizes = dict(group_sizes or {})  # unit -> devices (model copies) per replica; default 1
        self._meters: dict[Consumer, RateMeter] = {}
        self._admitted: Counter[Consumer] = Counter()  # steps announced by the gateways' admissions
        self._admission_meters: dict[Consumer, RateMeter] = {}
        self._service: dict[Consumer, float] = {}
        self._memory: dict[str, int] = {}
        self._device: dict[str, str] = {}

    @classmethod
    def for_policy(
        cls,
        bus: Bus,
        config: PolicyConfig,
        window_s: float,
        memory_per_replica: dict[str, int] | None = None,
        group_sizes: dict[str, int] | None = None,
    ) -> Observer:
        """An observer whose step time before any measurement is the policy's default."""
        return cls(bus, window_s, config.default_service_s, memory_per_replica, group_sizes)

    async def listen(self) -> None:
        """Hear the gateways' admission notices from now on."""
        await self.bus.subscribe_admitted(self._admitted.update)

    async def observe(
        self, units: dict[str, tuple[str, ...]], current: dict[str, int], now: float
    ) -> list[Observation]:
        counters = await self.bus.step_consumers()
        replicas = await live_replicas(self.bus)
        rates, expected = {}, {}
        for c in counters:
            key = (c.kind, c.model_id)
            rates[key] = self._meters.setdefault(key, RateMeter(self.window_s)).add(now, c.pending + c.delivered)
            foreseen = self._admission_meters.setdefault(key, RateMeter(self.window_s))
            expected[key] = foreseen.add(now, self._admitted[key])
        measured: dict[Consumer, list[float]] = {}
        for r in replicas:
            if r.seconds_per_item > 0:
                measured.setdefault((str(r.kind), r.model_id), []).append(r.seconds_per_item)
        for key, values in measured.items():
            self._service[key] = sum(values) / len(values)
        return [
            self._unit(name, models, current.get(name, 0), counters, (rates, expected), replicas)
            for name, models in units.items()
        ]

    def _unit(
        self,
        name: str,
        models: tuple[str, ...],
        current: int,
        counters: list[ConsumerCounters],
        rates: tuple[dict[Consumer, float], dict[Consumer, float]],
        replicas: list[ReplicaInfo],
    ) -> Observation:
        """`rates`: per consumer, the arrivals seen and those the admissions foresee."""
        mine = [c for c in counters if c.model_id in models]
        seen, foreseen = rates
        loads = [
            ConsumerLoad(
                backlog=c.backlog,
                arrival_rate=seen.get((c.kind, c.model_id), 0.0),
                step_s=self._service.get((c.kind, c.model_id)) or self.default_service_s,
                expected_rate=foreseen.get((c.kind, c.model_id), 0.0),
            )
            for c in mine
        ]
        served = [r for r in replicas if r.model_id in models]
        by_process: dict[str, list[ReplicaInfo]] = {}
        for r in served:
            by_process.setdefault(r.replica_id, []).append(r)
        if by_process:  # the largest replica now; with none live, the last one seen
            copies = self.group_sizes.get(name, 1)
            self._memory[name] = max(replica_memory(announced, copies) for announced in by_process.values())
            self._device[name] = next(iter(by_process.values()))[0].device
        known = [self._service[(c.kind, c.model_id)] for c in mine if self._service.get((c.kind, c.model_id))]
        service_s = max(known, default=0.0)  # measured only: 0 tells the policy nothing is known yet
        signal = unit_signal(
            name,
            current,
            loads,
            service_s=service_s,
            memory_bytes=self.memory_per_replica.get(name, self._memory.get(name, 0)),
            device=self._device.get(name, "cpu"),
        )
        return Observation(signal=signal, models=models, live=len(by_process), consumers=mine)


def replica_memory(announced: list[ReplicaInfo], group_size: int = 1) -> int:
    """One replica's memory as a budget counts it, from what its process announced: the resident
    set on a CPU; on an accelerator, its models' parameters (what takes the device's memory).
    A group replica of k devices (`group_size`, or the `group_devices` its leader announces)
    holds k copies: on a CPU its leader coordinates k follower processes and holds a copy of its
    own (the requests' loops read it), so k + 1 processes alike, k + 1 times its resident set;
    on GPUs the leader announces the parameters of all k copies already. The budget, kept per
    device, charges all k to the leader's device: on the safe side."""
    first = announced[0]
    if first.device == "cpu" and first.rss_bytes:
        k = max(1, group_size, first.group_devices)
        return first.rss_bytes * (k + 1 if k > 1 else 1)
    return sum({r.model_id: r.param_bytes for r in announced}.values())
