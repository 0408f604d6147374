"""The autoscaler's loop: observe -> decide -> act -> publish, once per `interval_s`.

Each change is logged with the policy's arithmetic as its reason, and the status of every unit
(replicas, backlog, rate, step time, memory, reason) is published to the `lego_autoscaler` KV
bucket, which the gateway's `GET /v1/status` and `lego status` read.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from services.autoscaler.actuators import Actuator
from services.autoscaler.placement import share_of
from services.autoscaler.policy import Limits, PolicyConfig, ScalePolicy, Slo, parse_limits
from services.autoscaler.signals import Observation, Observer
from shared.bus import Bus
from shared.messages import AutoscalerStatus, ScalingDecision, UnitScale
from shared.presence import publish_autoscaler_status
from shared.settings import Settings

log = logging.getLogger("lego.autoscaler")

KEEP_DECISIONS = 50


def policy_config(settings: Settings, **overrides: object) -> PolicyConfig:
    """The policy from LEGO_AUTOSCALE_* settings (keyword overrides win when not None)."""
    low, low_units = parse_limits(settings.autoscale_min, 1)
    high, high_units = parse_limits(settings.autoscale_max, 3)
    units = set(low_units) | set(high_units)
    budget_gb = settings.autoscale_memory_budget_gb or 0.8 * _host_memory_bytes() / 2**30
    values: dict[str, object] = {
        "slo": Slo.parse(settings.autoscale_slo),
        "utilisation": settings.autoscale_utilisation,
        "cooldown_s": settings.autoscale_cooldown_s,
        "memory_budget_bytes": int(budget_gb * 2**30),
        "warm_fill": settings.autoscale_warm_fill,
        "default_limits": Limits(low, max(high, low, 1)),
        "limits": {
            u: Limits(low_units.get(u, low), max(high_units.get(u, high), low_units.get(u, low), 1)) for u in units
        },
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return PolicyConfig(**values)  # type: ignore[arg-type]


def _host_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 16 * 2**30


@dataclass
class Tick:
    observations: list[Observation]
    decisions: list[ScalingDecision]


class Autoscaler:
    """Owns the policy state; runs on one event loop; calls the actuator from a worker thread
    (the Kubernetes and Docker clients block)."""

    def __init__(self, observer: Observer, actuator: Actuator, config: PolicyConfig, interval_s: float = 1.0) -> None:
        """`observer` reads the bus the policy decides from (`Observer.for_policy` builds one)."""
        self.bus = observer.bus
        self.actuator = actuator
        self.policy = ScalePolicy(config)
        self.observer = observer
        self.interval_s = interval_s
        self.decisions: deque[ScalingDecision] = deque(maxlen=KEEP_DECISIONS)

    async def tick(self, now: float | None = None) -> Tick:
        now = time.time() if now is None else now
        units = await asyncio.to_thread(self.actuator.units)
        current = {u: await asyncio.to_thread(self.actuator.current, u) for u in units}
        observations = await self.observer.observe(units, current, now)
        decisions = self.policy.decide([o.signal for o in observations], now)
        loads = {o.signal.unit: o.signal.load for o in observations}
        made = []
        for d in decisions:
            if not d.changed:
                continue
            log.info("scale %s %d -> %d: %s", d.unit, d.current, d.target, d.reason)
            share = share_of(loads[d.unit], d.target)  # what each new replica will keep busy (placement)
            try:
                await asyncio.to_thread(self.actuator.scale, d.unit, d.target, share)
            except Exception as exc:
                log.error("scaling %s to %d failed: %s", d.unit, d.target, exc)
                continue
            made.append(
                ScalingDecision(at=now, unit=d.unit, from_replicas=d.current, to_replicas=d.target, reason=d.reason)
            )
        self.decisions.extend(made)
        await self._publish(now, observations, decisions)
        return Tick(observations, made)

    async def _publish(self, now: float, observations: list[Observation], decisions: list) -> None:
        by_unit = {d.unit: d for d in decisions}
        units = []
        for o in observations:
            s, d = o.signal, by_unit[o.signal.unit]
            limits = self.policy.config.limits_of(s.unit)
            units.append(
                UnitScale(
                    unit=s.unit,
                    models=list(o.models),
                    replicas=d.target,
                    live=o.live,
                    desired=d.desired,
                    min_replicas=limits.min_replicas,
                    max_replicas=limits.max_replicas,
                    backlog=s.backlog,
                    arrival_rate=round(s.arrival_rate, 3),
                    seconds_per_item=round(s.service_s, 4),
                    memory_bytes=s.memory_bytes,
                    reason=d.reason,
                )
            )
        status = AutoscalerStatus(
            at=now,
            actuator=self.actuator.name,
            slo=str(self.policy.config.slo),
            units=units,
            decisions=list(self.decisions)[-20:],
        )
        try:
            await publish_autoscaler_status(self.bus, status)
        except Exception as exc:
            log.warning("publishing the status failed: %s", exc)

    async def run(self, stop: asyncio.Event) -> None:
        log.info(
            "autoscaling with the %s actuator: SLO %s, utilisation %g, cooldown %gs, every %gs",
            self.actuator.name,
            self.policy.config.slo,
            self.policy.config.utilisation,
            self.policy.config.cooldown_s,
            self.interval_s,
        )
        try:
            await self.observer.listen()
        except Exception as exc:  # scaling still works on what reaches the consumers
            log.warning("not hearing admissions (scaling on arrivals alone): %s: %s", type(exc).__name__, exc)
        while not stop.is_set():
            started = time.monotonic()
            try:
                await self.tick()
            except Exception as exc:  # a NATS hiccup or an API error: try again next tick
                log.warning("tick failed: %s: %s", type(exc).__name__, exc)
            try:
                await asyncio.wait_for(stop.wait(), max(0.05, self.interval_s - (time.monotonic() - started)))
            except TimeoutError:
                pass


class AutoscalerThread:
    """The autoscaler on its own event loop in a thread: how `lego up` embeds it beside the
    processes it scales. `stop()` ends the loop and closes its NATS connection."""

    def __init__(
        self,
        settings: Settings,
        actuator: Actuator,
        policy_overrides: dict[str, object] | None = None,
        memory_per_replica: dict[str, int] | None = None,
        group_sizes: dict[str, int] | None = None,
    ) -> None:
        """`group_sizes`: unit -> devices a replica holds (a parallel group, one model copy per
        device), for the units whose replicas are groups; see `Observer`."""
        self.settings = settings
        self.actuator = actuator
        self.policy_overrides = policy_overrides or {}
        self.memory_per_replica = memory_per_replica
        self.group_sizes = group_sizes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="autoscaler", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(30)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self.error = exc
            log.error("autoscaler stopped: %s: %s", type(exc).__name__, exc)
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        bus = Bus(self.settings, name="autoscaler")
        await bus.connect()
        s = self.settings
        config = policy_config(s, **self.policy_overrides)
        observer = Observer.for_policy(bus, config, s.autoscale_window_s, self.memory_per_replica, self.group_sizes)
        autoscaler = Autoscaler(observer, self.actuator, config, interval_s=s.autoscale_interval_s)
        self._ready.set()
        try:
            await autoscaler.run(self._stop)
        finally:
            await bus.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:
                pass
        self._thread.join(timeout_s)
