"""Pulling a model's steps band by band: higher priority first, lower never starved.

Each (kind, model) has one durable consumer per priority band (`subjects.PRIORITY_BANDS`),
shared by all its replicas. A replica asks the bands in order with a no-wait pull ("anything
now?"), so a waiting high-priority step is taken before any normal one, whatever their order
of arrival. When no band has work it lingers on every band at once and takes whichever step
comes first.

The anti-starvation guarantee (a deterministic credit, no clock): a lower band is asked
first once `fair_every` (N, default 4) steps have been taken from higher bands since it was
last asked first. So while a lower band has steps waiting, each replica takes at least one of
them in every N + 1 steps (N + a batch's size for a replica that takes several steps at once):
under a stream of high-priority work that never lets up, normal requests still get at least
1/(N+1) of every replica and finish; they wait longer, they never wait forever.

Why an inbox of our own per band instead of nats.py's `fetch`: `fetch(1)` can only linger, and
an abandoned lingering pull may deliver a step after we stopped waiting. Here every pull is
seen to its end: a lingering pull that loses the race keeps running (at most `linger_s`), and
what it delivers is held (kept alive with `in_progress`) and served first at the next fetch,
ahead of the band order: at most one step per band, already delivered to this replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from shared import subjects
from shared.bus import Bus
from shared.messages import StepKind

log = logging.getLogger("lego.worker")

FAIR_EVERY = 4  # a lower band is asked first after this many steps taken from higher bands
PROBE_TIMEOUT_S = 5.0  # a no-wait pull the server never answered (a reconnect): treat as empty


class BandPull:
    """One band's durable consumer, pulled through an inbox of this replica's own. At most one
    pull is outstanding at a time, so every status answer belongs to the pull in hand."""

    def __init__(self, bus: Bus, kind: StepKind | str, model_id: str, band: str) -> None:
        self.bus = bus
        self.kind = kind
        self.model_id = model_id
        self.band = band
        self._next = ""
        self._sub: Subscription | None = None

    async def start(self) -> None:
        durable = await self.bus.ensure_consumer(self.kind, self.model_id, self.band)
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{subjects.STEP_STREAM}.{durable}"
        self._sub = await self.bus.nc.subscribe(self.bus.nc.new_inbox())

    async def now(self, batch: int) -> list[Msg]:
        """Up to `batch` steps waiting in this band now; none if it is empty (no waiting)."""
        return await self._pull({"batch": batch, "no_wait": True}, batch, PROBE_TIMEOUT_S)

    async def linger(self, wait_s: float) -> list[Msg]:
        """The first step to arrive in this band within `wait_s` (none if none does)."""
        return await self._pull({"batch": 1, "expires": int(wait_s * 1e9)}, 1, wait_s + PROBE_TIMEOUT_S)

    async def _pull(self, request: dict[str, object], batch: int, timeout_s: float) -> list[Msg]:
        assert self._sub is not None, "BandPull.start() was not awaited"
        await self.bus.nc.publish(self._next, json.dumps(request).encode(), reply=self._sub.subject)
        msgs: list[Msg] = []
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout_s
        while len(msgs) < batch:
            try:
                msg = await self._sub.next_msg(timeout=max(0.01, give_up - loop.time()))
            except TimeoutError:
                break
            status = JetStreamContext.is_status_msg(msg)
            if status == "100":  # a heartbeat: the pull is still open
                continue
            if status:  # 404 no messages, 408 expired, 409 the consumer changed: this pull is over
                break
            msgs.append(msg)
        return msgs

    async def close(self) -> None:
        """Hand back (nak) a step that arrived after its pull gave up, then drop the inbox."""
        if self._sub is None:
            return
        while self._sub.pending_msgs:
            try:
                msg = await self._sub.next_msg(timeout=0.1)
            except TimeoutError:
                break
            if not JetStreamContext.is_status_msg(msg):
                with contextlib.suppress(Exception):
                    await msg.nak()
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()
        self._sub = None


class PriorityPuller:
    """Fetches a (kind, model)'s steps for one replica: held steps first, then the bands in
    priority order (a lower band first when its credit says so), lingering on all when empty."""

    def __init__(self, bus: Bus, kind: StepKind | str, model_id: str, fair_every: int = FAIR_EVERY) -> None:
        self.bands = [BandPull(bus, kind, model_id, band) for band in subjects.BAND_NAMES]  # highest first
        self.fair_every = max(1, fair_every)
        self.keep_alive_s = max(0.2, bus.settings.ack_wait_s / 3)
        # passed[i]: steps taken from bands above band i since band i was last asked first
        self._passed = [0] * len(self.bands)
        self._lingering: dict[int, asyncio.Task[list[Msg]]] = {}
        self._held: dict[int, list[tuple[Msg, asyncio.Task[None]]]] = {i: [] for i in range(len(self.bands))}

    async def start(self) -> None:
        for band in self.bands:
            await band.start()

    def order(self) -> list[int]:
        """Band indexes in the order to ask them: owed lower bands (most owed first), then the rest by rank."""
        owed = sorted(
            (i for i in range(1, len(self.bands)) if self._passed[i] >= self.fair_every), key=lambda i: -self._passed[i]
        )
        return owed + [i for i in range(len(self.bands)) if i not in owed]

    async def fetch(self, room: int, linger_s: float) -> list[Msg]:
        """Up to `room` steps (at least one), or none after about `linger_s` without any."""
        order = self.order()
        msgs = self._take_held(order, room)
        if msgs:
            return msgs
        asked: list[int] = []
        for i in order:
            if i in self._lingering:  # its lingering pull is still open: what it gets is held
                continue
            msgs = await self.bands[i].now(room)
            if msgs:
                self._took(i, len(msgs), asked)
                return msgs
            asked.append(i)
        for i in range(len(self.bands)):
            if i not in self._lingering:
                task = asyncio.create_task(self.bands[i].linger(linger_s))
                task.add_done_callback(functools.partial(self._landed, i))
                self._lingering[i] = task
        await asyncio.wait(set(self._lingering.values()), return_when=asyncio.FIRST_COMPLETED)
        return self._take_held(self.order(), room)

    def _took(self, i: int, count: int, asked: list[int]) -> None:
        """Credit: band `i` was served; bands asked before it had nothing (they are owed nothing);
        every lower band not asked has `count` more steps passed over it."""
        for j in [*asked, i]:
            self._passed[j] = 0
        for j in range(i + 1, len(self.bands)):
            if j not in asked:
                self._passed[j] += count

    def _landed(self, i: int, task: asyncio.Task[list[Msg]]) -> None:
        """A lingering pull ended: hold what it delivered, kept alive until it is fetched."""
        self._lingering.pop(i, None)
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled():
                log.warning("pull on band %r failed: %s", self.bands[i].band, task.exception())
            return
        for msg in task.result():
            self._held[i].append((msg, asyncio.create_task(self._keep_alive(msg))))

    def _take_held(self, order: list[int], room: int) -> list[Msg]:
        out: list[Msg] = []
        for i in order:
            while self._held[i] and len(out) < room:
                msg, keepalive = self._held[i].pop(0)
                keepalive.cancel()
                out.append(msg)
                self._took(i, 1, [])
        return out

    async def _keep_alive(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self.keep_alive_s)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def close(self) -> None:
        """Let lingering pulls end, hand back (nak) what they delivered, close the inboxes:
        another replica takes those steps now instead of after AckWait."""
        if self._lingering:
            await asyncio.wait(set(self._lingering.values()))
        for held in self._held.values():
            for msg, keepalive in held:
                keepalive.cancel()
                with contextlib.suppress(Exception):
                    await msg.nak()
            held.clear()
        for band in self.bands:
            await band.close()
