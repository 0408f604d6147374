"""Refusing what cannot finish in time: 429 + Retry-After when the backlog outlasts a deadline.

Why: a request that will surely miss its deadline only takes a place in every queue it joins
and makes the requests behind it late too; its client is better served by an immediate "come
back in N seconds" than by a timeout. The estimate is deliberately low (so nothing that could
make it is refused): for each model of the workflow, the steps queued or in hand on its
consumer, times the step time its replicas measure, spread over its replicas; the request
must wait at least the largest of these before its own step of that model can start. Models
without a measured step time, or without live replicas, count as no wait.

Steps on their way: a request this gateway admitted whose stages before a model are still
running will publish its step of that model within seconds, ahead of the new request's. So a
model's queue counts those too (`Orchestrator.waiting_steps`). Without them a burst was
admitted in full while it sat at the text encoders, and then missed at the denoiser: the
monolith's one queue a pipeline sees all of it, the mesh's per model did not (in the simulated
production day, bench/diurnal.py at 64 GPUs, counting them took the mesh's day from 83% to 88%
of requests within their SLO). Only this gateway's own requests count: behind a balancer each
gateway sees its share, which keeps the estimate low.

Priority: a step waits only behind steps of its own priority band and the higher ones (a
replica asks the higher bands first, `shared/priority_pull.py`), so a request counts only
that backlog: a priority-9 request is not refused for a queue of priority-0 work. (Lower-band
steps already in hand on a replica do delay it a little; leaving them out keeps the estimate
low, as above.)
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

from services.gateway.errors import APIError
from shared import subjects
from shared.bus import Bus
from shared.messages import ReplicaInfo
from shared.presence import live_replicas
from shared.workflows.spec import WorkflowSpec


@dataclass(frozen=True)
class ModelLoad:
    """One (kind, model) step consumer: what is queued, and how fast its replicas drain it."""

    backlog: int
    replicas: int
    # Measured, averaged over its replicas (0: none yet). A batching replica measures the busy
    # time between completions, so this is per step whatever its batch size.
    seconds_per_item: float
    bands: tuple[tuple[str, int], ...] = ()  # (priority band, backlog) of each band's consumer

    def ahead_of(self, priority: int) -> int:
        """The steps a new step of `priority` waits behind: its band's and the higher bands'."""
        if not self.bands:
            return self.backlog
        counted = subjects.bands_at_or_above(priority)
        return sum(n for band, n in self.bands if band in counted)

    def wait_s(self, priority: int = 0, coming: int = 0) -> float:
        """Seconds until a new step of `priority` could start here, at the least, with `coming`
        more steps of equal or higher priority on their way (requests in earlier stages)."""
        ahead = self.ahead_of(priority) + coming
        if self.replicas == 0 or self.seconds_per_item <= 0 or ahead == 0:
            return 0.0
        return ahead * self.seconds_per_item / max(1, self.replicas)


class LoadView:
    """Every step consumer's load, read from JetStream and the presence bucket at most every
    `max_age_s` (a burst of requests shares one read instead of each making two)."""

    def __init__(self, bus: Bus, max_age_s: float = 1.0) -> None:
        self.bus = bus
        self.max_age_s = max_age_s
        self._loads: dict[tuple[str, str], ModelLoad] = {}
        self._read_at = -math.inf
        self._lock = asyncio.Lock()

    async def loads(self) -> dict[tuple[str, str], ModelLoad]:
        async with self._lock:
            if time.monotonic() - self._read_at > self.max_age_s:
                self._loads = await self._read()
                self._read_at = time.monotonic()
            return self._loads

    async def _read(self) -> dict[tuple[str, str], ModelLoad]:
        replicas = await live_replicas(self.bus)
        loads = {}
        for c in await self.bus.step_consumers():
            count, step_s = serving(replicas, c.kind, c.model_id)
            loads[(c.kind, c.model_id)] = ModelLoad(
                backlog=c.backlog, replicas=count, seconds_per_item=step_s, bands=c.bands
            )
        return loads


def serving(replicas: list[ReplicaInfo], kind: str, model_id: str) -> tuple[int, float]:
    """The live replicas consuming (kind, model) and their measured step time, averaged (0: none yet)."""
    mine = [r for r in replicas if str(r.kind) == kind and r.model_id == model_id]
    measured = [r.seconds_per_item for r in mine if r.seconds_per_item > 0]
    return len(mine), (sum(measured) / len(measured) if measured else 0.0)


def queue_wait_s(
    loads: dict[tuple[str, str], ModelLoad],
    workflow: WorkflowSpec,
    priority: int = 0,
    coming: Mapping[tuple[str, str], int] | None = None,
) -> tuple[float, str]:
    """The least a new request of `workflow` and `priority` must wait, and the model it waits on
    ("" if none); `coming`: (kind, model) -> steps on their way (see the module docstring)."""
    worst, where = 0.0, ""
    for node in workflow.nodes:
        key = (str(node.kind), node.model)
        load = loads.get(key)
        wait = load.wait_s(priority, (coming or {}).get(key, 0)) if load is not None else 0.0
        if wait > worst:
            worst, where = wait, node.model
    return worst, where


async def refuse_if_overloaded(
    view: LoadView,
    workflow: WorkflowSpec,
    deadline_s: float,
    priority: int = 0,
    coming: Mapping[tuple[str, str], int] | None = None,
) -> None:
    """Raise a 429 (with Retry-After) when the backlog a request of `priority` waits behind
    alone outlasts its deadline."""
    wait, model = queue_wait_s(await view.loads(), workflow, priority, coming)
    if wait <= deadline_s:
        return
    retry_after = max(1, math.ceil(wait - deadline_s))
    raise APIError(
        429,
        "overloaded",
        f"{model} has about {wait:.0f}s of work queued ahead of this request, more than its {deadline_s:.0f}s "
        f"deadline; retry in {retry_after}s, or allow more time with timeout_s",
        headers={"Retry-After": str(retry_after)},
    )
