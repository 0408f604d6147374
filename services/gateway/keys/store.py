"""The keys of every gateway: a JetStream KV bucket (`LEGO_KEYS`), one entry per key name,
mirrored in each gateway's memory by a watch on the bucket.

Why a watch and not a read per request: a request is checked with one dictionary lookup (by
the hash of its key), and a revocation (an entry deleted, or marked `revoked`) reaches every
gateway's index as soon as NATS delivers the change, typically well under a second.
Why the name is the KV key: `kv.create` refuses an existing one, so two gateways cannot hand
out the same name at once, and `DELETE /v1/keys/{name}` needs no search.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.gateway.keys.model import KeyLimits, KeyRecord, Scope
from services.gateway.keys.secret import hash_key, new_key, new_key_id
from services.gateway.schemas import MAX_PRIORITY
from shared import kv_mirror, subjects
from shared.bus import Bus

log = logging.getLogger("lego.gateway.keys")

BUCKET = subjects.KEYS_BUCKET  # the bus roles give this bucket to the gateway alone
ADMIN_NAME = "admin"
ADMIN_LIMITS = KeyLimits(scopes=list(Scope), rate_per_min=0, max_in_flight=0, max_priority=MAX_PRIORITY)


class KeyExists(Exception):
    """`POST /v1/keys` with a name a live key has."""


class KeyStore:
    """The bucket and this gateway's index of it (by hash). `start()` returns once the index
    holds every key already stored; from then on it follows the bucket."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._kv: KeyValue | None = None
        self._by_hash: dict[str, KeyRecord] = {}
        self._by_name: dict[str, KeyRecord] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("KeyStore.start() was not called")
        return self._kv

    async def start(self) -> None:
        try:
            self._kv = await self.bus.js.key_value(BUCKET)
        except BucketNotFoundError:
            self._kv = await self.bus.create_bucket(BUCKET, history=1)
        loaded = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(
            kv_mirror.follow(self.kv, BUCKET, KeyRecord.model_validate_json, self._replace, self._apply, loaded),
            name="keys-watch",
        )
        await loaded

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- reading: from memory --------------------------------------------------------------

    def lookup(self, key: str) -> KeyRecord | None:
        """The live record of `key` (a secret as a client sent it), or None."""
        record = self._by_hash.get(hash_key(key))
        return None if record is None or record.revoked else record

    def list(self) -> list[KeyRecord]:
        return sorted((r for r in self._by_name.values() if not r.revoked), key=lambda r: r.created)

    # -- writing: to the bucket (and at once to this gateway's index) -----------------------

    async def create(self, name: str, limits: KeyLimits) -> tuple[str, KeyRecord]:
        """A new key named `name`: (the key, shown this once; its record). KeyExists if taken."""
        key = new_key()
        record = KeyRecord(key_id=new_key_id(), name=name, hash=hash_key(key), **limits.model_dump())
        try:
            await self.kv.create(name, record.model_dump_json().encode())
        except KeyWrongLastSequenceError as exc:
            raise KeyExists(name) from exc
        self._apply(name, record)
        return key, record

    async def revoke(self, name: str) -> KeyRecord | None:
        """Delete the key named `name` (every gateway refuses it once the delete reaches it);
        its record, or None if there was none."""
        record = self._by_name.get(name)
        if record is None or record.revoked:
            return None
        await self.kv.delete(name)
        self._apply(name, None)
        return record

    async def ensure_admin(self, key: str) -> None:
        """Make `key` the admin key (named `admin`, every scope, no limits) unless it is already."""
        current = await self._read(ADMIN_NAME)
        if current is not None and current.hash == hash_key(key) and not current.revoked:
            self._apply(ADMIN_NAME, current)
            return
        if current is not None:
            log.warning("replacing the stored admin key with the one of this gateway's admin key file")
        record = KeyRecord(
            key_id=current.key_id if current else new_key_id(),
            name=ADMIN_NAME,
            hash=hash_key(key),
            created=time.time(),
            **ADMIN_LIMITS.model_dump(),
        )
        await self.kv.put(ADMIN_NAME, record.model_dump_json().encode())
        self._apply(ADMIN_NAME, record)

    async def _read(self, name: str) -> KeyRecord | None:
        try:
            entry = await self.kv.get(name)
        except KeyNotFoundError:
            return None
        return KeyRecord.model_validate_json(entry.value) if entry.value else None

    # -- following the bucket ----------------------------------------------------------------

    def _apply(self, name: str, record: KeyRecord | None) -> None:
        """Index `record` under `name` (None: the key is gone), dropping what it replaces."""
        old = self._by_name.pop(name, None)
        if old is not None:
            self._by_hash.pop(old.hash, None)
        if record is not None:
            self._by_name[name] = record
            self._by_hash[record.hash] = record

    def _replace(self, records: dict[str, KeyRecord]) -> None:
        self._by_name, self._by_hash = {}, {}
        for name, record in records.items():
            self._apply(name, record)
