"""Which gateway drives which request, and the takeover of a dead gateway's requests.

Two buckets. `lego_gateways` holds a heartbeat key a gateway, with a TTL of 5 heartbeats: a
gateway that dies (kill -9, lost host) stops refreshing and its key expires; one that drains
deletes its key at once. `LEGO_LEASES` holds a lease a running request (key: the record's key,
value: the gateway driving it), written when it starts and deleted when it ends: two KV writes
a request, none a step.

Every gateway looks at the heartbeats each beat; when one it saw alive is gone (and every
`SCAN_EVERY` beats anyway, and at its start), it scans the leases. A lease held by a gateway not
alive is taken with a revision-checked update, so of several survivors exactly one adopts each
request; the winner finishes it (orchestrator.adopt). Takeover time: up to 5 heartbeats to see
the death (or 1 when the gateway drained), then the scan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from services.gateway.errors import BUS_FAULTS
from services.gateway.records import bucket
from shared import subjects
from shared.bus import Bus

log = logging.getLogger("lego.gateway")
SCAN_EVERY = 10  # heartbeats between scans when no gateway was seen to die
DEAD_AFTER_BEATS = 5  # a gateway silent this many heartbeats is dead (a busy event loop misses a few)
HOLD_WITHIN_S = 5.0  # a request's lease is tried this long while the bus does not answer
HOLD_RETRY_S = 0.5
Adopt = Callable[[str, list[str]], Awaitable[None]]  # (dead gateway, record keys now ours)
Fenced = Callable[[], Awaitable[None]]  # this gateway was taken for dead: let go of what others took


class Leases:
    def __init__(self, bus: Bus, adopt: Adopt, fenced: Fenced | None = None) -> None:
        self.bus = bus
        self.gateway_id = bus.settings.gateway_id
        self.beat_s = bus.settings.gateway_heartbeat_s
        self.adopt = adopt
        self.fenced = fenced
        self._revision = 0  # of this gateway's heartbeat key: a put that finds another was missed
        self._adopting: set[asyncio.Task[None]] = set()
        self._gateways: KeyValue | None = None
        self._leases: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None
        self._seen: set[str] = set()
        self.released = False

    @property
    def leases(self) -> KeyValue:
        if self._leases is None:
            raise RuntimeError("Leases.start() was not called")
        return self._leases

    async def start(self) -> None:
        self._gateways = await bucket(self.bus, subjects.GATEWAYS_BUCKET, DEAD_AFTER_BEATS * self.beat_s)
        self._leases = await bucket(self.bus, subjects.LEASES_BUCKET, self.bus.settings.request_record_ttl_s)
        await self._beat()
        self._task = asyncio.create_task(self._run(), name="leases")

    async def hold(self, key: str, within_s: float = HOLD_WITHIN_S) -> None:
        """Take the lease of a request this gateway starts. Tried again for `within_s` while the
        bus does not answer: a NATS cluster electing a stream's leader takes a few seconds, and
        the request need not fail for it."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + within_s
        while True:
            try:
                await self.leases.put(key, self.gateway_id.encode())
                return
            except BUS_FAULTS as exc:
                if loop.time() >= give_up:
                    raise
                log.info("taking the lease of %s failed (%s); trying again", key, exc)
                await asyncio.sleep(HOLD_RETRY_S)

    async def drop(self, key: str) -> None:
        """Let go of a request that ended (a failure to delete is harmless: a lease of an ended
        request is dropped by whoever adopts it)."""
        with contextlib.suppress(Exception):
            await self.leases.delete(key)

    async def release_all(self) -> None:
        """Draining: stop beating and delete the heartbeat, so the survivors adopt this
        gateway's requests at their next beat."""
        self.released = True
        await self.close()
        if self._gateways is not None:
            with contextlib.suppress(Exception):
                await self._gateways.delete(self.gateway_id)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _beat(self) -> None:
        """Refresh the heartbeat. Its key expired meanwhile (this gateway stalled past the TTL,
        so the others took it for dead and may have adopted its requests): `fenced` lets go
        of those, so no request is driven by two gateways."""
        assert self._gateways is not None
        if self._revision:
            try:
                self._revision = await self._gateways.update(self.gateway_id, b"alive", last=self._revision)
                return
            except KeyWrongLastSequenceError:
                log.warning("this gateway's heartbeat expired (it stalled): letting go of adopted requests")
                if self.fenced is not None:
                    await self.fenced()
        self._revision = await self._gateways.put(self.gateway_id, b"alive")

    async def _alive(self) -> set[str]:
        assert self._gateways is not None
        try:
            return set(await self._gateways.keys())
        except NoKeysError:
            return set()

    async def _run(self) -> None:
        beats = 0
        while True:
            try:
                await self._beat()
                alive = await self._alive()
                if self._seen - alive or beats % SCAN_EVERY == 0:
                    # The first scan takes leases of this gateway's own id too: a process
                    # restarted under the same id (a container in its pod) drives none of them.
                    await self._scan(alive, own_too=beats == 0)
                self._seen = alive
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("lease check failed (%s); trying again", exc)
            beats += 1
            await asyncio.sleep(self.beat_s)

    async def _scan(self, alive: set[str], own_too: bool = False) -> None:
        """Take every lease whose gateway is not alive; hand them to `adopt`, by dead gateway."""
        try:
            keys = await self.leases.keys()
        except NoKeysError:
            return
        taken: dict[str, list[str]] = {}
        for key in keys:
            try:
                entry = await self.leases.get(key)
            except KeyNotFoundError:
                continue
            if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                continue
            holder = entry.value.decode()
            if holder in alive and not (own_too and holder == self.gateway_id):
                continue
            try:
                await self.leases.update(key, self.gateway_id.encode(), last=entry.revision)
            except KeyWrongLastSequenceError:
                continue  # another survivor took it first
            taken.setdefault(holder, []).append(key)
        for dead, keys_taken in taken.items():
            log.info("gateway %s is gone: adopting its %d running request(s)", dead, len(keys_taken))
            # Not awaited here: the heartbeat must go on while many requests are adopted.
            task = asyncio.create_task(self._adopt(dead, keys_taken), name=f"adopt-{dead}")
            self._adopting.add(task)
            task.add_done_callback(self._adopting.discard)

    async def _adopt(self, dead: str, keys: list[str]) -> None:
        try:
            await self.adopt(dead, keys)
        except Exception:
            log.exception("adopting the requests of %s failed", dead)

    async def mine(self, key: str) -> bool:
        """Whether this gateway still holds the lease of `key`."""
        try:
            entry = await self.leases.get(key)
        except KeyNotFoundError:
            return False
        return entry.value == self.gateway_id.encode()
