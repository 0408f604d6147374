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

Why pulls of our own instead of nats.py's `fetch`: `fetch(1)` cannot ask "anything now?"
without lingering, and a lingering pull cannot be called off. Here each lingering pull has an
inbox of its own, dropped as soon as any band delivers: JetStream skips a waiting pull whose
inbox nobody listens to, so the step goes to another replica instead of to this busy one. A
step that another band delivered in that same instant is held (kept alive with `in_progress`)
and served first at the next fetch: at most one a band, already delivered to this replica.
(One still on the wire as its inbox is dropped is redelivered after AckWait, as when a replica
dies mid-step: late, never lost.)

A higher band found empty is not asked again until a step is published on it. Asking an empty
band before every step cost a round trip and a wake-up a step (a fifth of a no-op step's bus
work, bench/control_plane.py), and the high band is empty nearly always. So while a replica
trusts a band to be empty it listens to that band's subject (core NATS: it hears every step
published there), subscribed before the probe that found the band empty, so no step stored
after that answer goes unheard. A band that has steps is asked before every step as before,
unheard (its subscription dropped: it would hear each of them). The trust lasts at most
QUIET_TRUST_S: a step that comes back without being published again (handed back with a nak,
redelivered after AckWait) and one published while a reconnect was under way are found by then.

So a replica with one step in hand at a time, whose higher bands are all heard empty, waits on
the lowest band alone: one lingering pull through that band's own inbox (no no-wait probe first:
a lingering pull answers at once when a step waits; no inboxes made and dropped). A step heard
on a higher band wakes it; the pull is then called off by replacing that inbox. Otherwise (several
steps in hand at once, a higher band not heard empty) it lingers on every band as above.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from shared import nats_handoff, subjects
from shared.bus import Bus
from shared.keep_alive import KeepAlive, keep_alive_s
from shared.messages import StepKind

FAIR_EVERY = 4  # a lower band is asked first after this many steps taken from higher bands
PROBE_TIMEOUT_S = 5.0  # a no-wait pull the server never answered (a reconnect): treat as empty
# Lingering pulls all refused at once (a consumer without a leader while a NATS cluster elects
# one answers 503 at once): wait this long before asking again, rather than spin on the refusals.
REFUSED_PAUSE_S = 0.2
QUIET_TRUST_S = 1.0  # a band heard to be empty is asked again at least this often


class BandPull:
    """One band's durable consumer, pulled through an inbox of this replica's own. At most one
    pull is outstanding at a time, so every status answer belongs to the pull in hand.

    A `watched` band (any but the lowest) is trusted to be empty, and not asked, from a probe
    that found it empty until a step is heard on its subject (see the module's docstring)."""

    def __init__(self, bus: Bus, kind: StepKind | str, model_id: str, band: str, watched: bool = False) -> None:
        self.bus = bus
        self.kind = kind
        self.model_id = model_id
        self.band = band
        self.watched = watched
        self._next = ""
        self._sub: Subscription | None = None
        self._watch: Subscription | None = None  # the band's subject, heard while it is trusted empty
        self._empty_since: float | None = None  # set and cleared in the read loop, in arrival order
        self.on_heard: Callable[[], None] | None = None  # called when a step is heard on the band
        # What the inbox received, read by `now()` and `linger()`; None: `wake()` was called. Our
        # own queue, filled in nats.py's read loop (shared/nats_handoff.py): nats.py's `next_msg`
        # starts two tasks and draws a uuid4 per message, which cost more than a step's bus work.
        self._arrived: asyncio.Queue[Msg | None] = asyncio.Queue()

    async def start(self) -> None:
        durable = await self.bus.ensure_consumer(self.kind, self.model_id, self.band)
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{subjects.STEP_STREAM}.{durable}"
        self._sub = await nats_handoff.subscribe(self.bus.nc, self.bus.nc.new_inbox(), self._landed)

    def _landed(self, msg: Msg) -> None:
        """The inbox's message (read loop): a "no messages" answer to a probe sent while
        listening makes the band trusted empty, unless a step is heard after it."""
        if self._watch is not None and JetStreamContext.is_status_msg(msg) == "404":
            self._empty_since = asyncio.get_running_loop().time()
        self._arrived.put_nowait(msg)

    def _heard(self, msg: Msg) -> None:
        self._empty_since = None
        if self.on_heard is not None:
            self.on_heard()

    def wake(self) -> None:
        """End a `linger()` in progress (from the read loop: a higher band was heard)."""
        self._arrived.put_nowait(None)

    def trusted_empty(self) -> bool:
        """Whether this band need not be asked now: found empty, and nothing heard since."""
        since = self._empty_since
        return since is not None and asyncio.get_running_loop().time() - since < QUIET_TRUST_S

    def heard_of_work(self) -> None:
        """A step of this band came another way (a lingering pull): ask it again next time."""
        self._empty_since = None

    async def _listen(self, on: bool) -> None:
        if on and self._watch is None:
            subject = subjects.step_subject(self.kind, self.model_id, self.band)
            self._watch = await nats_handoff.subscribe(self.bus.nc, subject, self._heard)
        elif not on and self._watch is not None:
            watch, self._watch = self._watch, None
            with contextlib.suppress(Exception):
                await watch.unsubscribe()

    async def _next_msg(self, timeout_s: float) -> Msg | None:
        """The inbox's next message (None: a wake); TimeoutError after `timeout_s` without one."""
        if not self._arrived.empty():
            return self._arrived.get_nowait()
        async with asyncio.timeout(timeout_s):
            return await self._arrived.get()

    async def now(self, batch: int) -> list[Msg]:
        """Up to `batch` steps waiting in this band now; none if it is empty (no waiting)."""
        assert self._sub is not None, "BandPull.start() was not awaited"
        self._empty_since = None
        if self.watched:
            await self._listen(True)  # before the probe: a step stored after its answer is heard
        await self.ask({"batch": batch, "no_wait": True}, self._sub.subject)
        msgs: list[Msg] = []
        loop = asyncio.get_running_loop()
        give_up = loop.time() + PROBE_TIMEOUT_S
        while len(msgs) < batch:
            try:
                msg = await self._next_msg(max(0.01, give_up - loop.time()))
            except TimeoutError:
                break
            if msg is None:  # a wake left over from a linger that ended otherwise
                continue
            status = JetStreamContext.is_status_msg(msg)
            if status == "100":  # a heartbeat: the pull is still open
                continue
            if status:  # 404 no messages, 408 expired, 409 the consumer changed: this pull is over
                break
            msgs.append(msg)
        if msgs and self.watched:
            self._empty_since = None
            await self._listen(False)  # the band has work: asked before every step, not heard
        return msgs

    async def linger(self, linger_s: float) -> tuple[list[Msg], str]:
        """One lingering pull (batch 1) through this band's own inbox: no inbox to make and drop
        each time, as `PriorityPuller._linger` needs for several bands. Returns (steps, how):
        ([step], "step"); ([], "ended") when the pull expired or was refused; or, after `wake()`,
        (steps, "woken"): the pull is called off by replacing the inbox, and a step that reached
        the old one already is returned (to hold)."""
        assert self._sub is not None, "BandPull.start() was not awaited"
        for kept in _drain(self._arrived):  # wakes from before this linger are dropped
            if kept is not None:
                self._arrived.put_nowait(kept)
        await self.ask({"batch": 1, "expires": int(linger_s * 1e9)}, self._sub.subject)
        try:
            while True:
                got = await self._next_msg(linger_s + PROBE_TIMEOUT_S)
                if got is None:
                    return await self._renew_inbox(), "woken"
                status = JetStreamContext.is_status_msg(got)
                if status == "100":
                    continue
                return ([], "ended") if status else ([got], "step")
        except TimeoutError:  # never answered (a reconnect lost the pull): start afresh
            return await self._renew_inbox(), "ended"

    async def _renew_inbox(self) -> list[Msg]:
        """Drop the inbox (JetStream then skips the pull waiting on it) for a new one; the steps
        that reached the old one already."""
        old, self._sub = self._sub, None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.unsubscribe()
        stranded = [m for m in _drain(self._arrived) if m is not None and not JetStreamContext.is_status_msg(m)]
        self._sub = await nats_handoff.subscribe(self.bus.nc, self.bus.nc.new_inbox(), self._landed)
        return stranded

    async def ask(self, request: dict[str, object], inbox: str) -> None:
        """Send a pull request for this band's consumer, answered on `inbox`."""
        await self.bus.nc.publish(self._next, json.dumps(request).encode(), reply=inbox)

    async def close(self) -> None:
        """Hand back (nak) a step that arrived after its pull gave up, then drop the inbox."""
        if self._sub is None:
            return
        await self._listen(False)
        await asyncio.sleep(0)  # what nats.py holds for the callback reaches the queue first
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()
        self._sub = None
        while not self._arrived.empty():
            msg = self._arrived.get_nowait()
            if msg is not None and not JetStreamContext.is_status_msg(msg):
                with contextlib.suppress(Exception):
                    await msg.nak()


class PriorityPuller:
    """Fetches a (kind, model)'s steps for one replica: held steps first, then the bands in
    priority order (a lower band first when its credit says so), lingering when all are empty."""

    def __init__(self, bus: Bus, kind: StepKind | str, model_id: str, fair_every: int = FAIR_EVERY) -> None:
        self.bus = bus
        last = len(subjects.BAND_NAMES) - 1
        self.bands = [  # highest first; every band but the lowest watched
            BandPull(bus, kind, model_id, band, watched=i < last) for i, band in enumerate(subjects.BAND_NAMES)
        ]
        self.fair_every = max(1, fair_every)
        self.keep_alive_s = keep_alive_s(bus.settings)
        # passed[i]: steps taken from bands above band i since band i was last asked first
        self._passed = [0] * len(self.bands)
        self._held: dict[int, list[tuple[Msg, KeepAlive]]] = {i: [] for i in range(len(self.bands))}
        self._lingering = False  # the lowest band's linger is on: a higher band heard wakes it
        for band in self.bands[:last]:
            band.on_heard = self._heard_higher

    def _heard_higher(self) -> None:
        if self._lingering:
            self.bands[-1].wake()

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
        """Up to `room` steps, or none after about `linger_s` without any."""
        order = self.order()
        msgs = self._take_held(order, room)
        if msgs:
            return msgs
        asked: list[int] = []
        last = len(self.bands) - 1
        for i in order:
            if self.bands[i].trusted_empty():
                asked.append(i)  # as good as asked: nothing published there since it was
                continue
            if i == last and room == 1 and len(asked) == last:
                break  # every higher band empty: the lowest band's lingering pull answers at once if it has a step
            msgs = await self.bands[i].now(room)
            if msgs:
                self._took(i, len(msgs), asked)
                return msgs
            asked.append(i)
        loop = asyncio.get_running_loop()
        lingered = loop.time()
        if room == 1 and all(band.trusted_empty() for band in self.bands[:last]):
            msgs, how = await self._linger_lowest(linger_s)
            if how == "step":
                self._took(last, len(msgs), list(range(last)))
                return msgs
            if how == "woken":  # a higher band was heard: it is asked next (steps stranded meanwhile held)
                return []
        else:
            await self._linger(linger_s)
        msgs = self._take_held(self.order(), room)
        if not msgs and loop.time() - lingered < min(linger_s, REFUSED_PAUSE_S):
            await asyncio.sleep(REFUSED_PAUSE_S)
        return msgs

    async def _linger_lowest(self, linger_s: float) -> tuple[list[Msg], str]:
        """Linger on the lowest band alone, the higher ones heard (they wake it): one pull, no
        inbox made and dropped, for a replica waiting while its higher bands are empty."""
        self._lingering = True
        try:
            msgs, how = await self.bands[-1].linger(linger_s)
        finally:
            self._lingering = False
        if how == "woken":
            last = len(self.bands) - 1
            self._held[last] += [(msg, KeepAlive(msg, self.keep_alive_s)) for msg in msgs]
        return msgs, how

    async def _linger(self, linger_s: float) -> None:
        """One lingering pull a band, each on an inbox of its own; when the first step arrives
        (or every pull ends) the inboxes are dropped, which calls the other pulls off."""
        nc = self.bus.nc
        woken = asyncio.Event()
        ended = [0]
        subs: list[Subscription] = []

        def on_answer(i: int) -> Callable[[Msg], None]:
            def landed(msg: Msg) -> None:
                status = JetStreamContext.is_status_msg(msg)
                if status == "100":  # a heartbeat
                    return
                if status:  # expired, or the consumer changed: this band's pull is over
                    ended[0] += 1
                else:
                    self.bands[i].heard_of_work()
                    self._held[i].append((msg, KeepAlive(msg, self.keep_alive_s)))
                if not status or ended[0] == len(self.bands):
                    woken.set()

            return landed

        try:
            for i, band in enumerate(self.bands):
                sub = await nats_handoff.subscribe(nc, nc.new_inbox(), on_answer(i))
                subs.append(sub)
                await band.ask({"batch": 1, "expires": int(linger_s * 1e9)}, sub.subject)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), linger_s + PROBE_TIMEOUT_S)
        finally:
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    def _took(self, i: int, count: int, asked: list[int]) -> None:
        """Credit: band `i` was served; bands asked before it had nothing (they are owed nothing);
        every lower band not asked has `count` more steps passed over it."""
        for j in [*asked, i]:
            self._passed[j] = 0
        for j in range(i + 1, len(self.bands)):
            if j not in asked:
                self._passed[j] += count

    def _take_held(self, order: list[int], room: int) -> list[Msg]:
        out: list[Msg] = []
        for i in order:
            while self._held[i] and len(out) < room:
                msg, keepalive = self._held[i].pop(0)
                keepalive.cancel()
                out.append(msg)
                self._took(i, 1, [])
        return out

    async def close(self) -> None:
        """Hand back (nak) held steps and close the inboxes: another replica takes those steps
        now instead of after AckWait."""
        for held in self._held.values():
            for msg, keepalive in held:
                keepalive.cancel()
                with contextlib.suppress(Exception):
                    await msg.nak()
            held.clear()
        for band in self.bands:
            await band.close()


def _drain(queue: asyncio.Queue[Msg | None]) -> list[Msg | None]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out
