"""`Idempotency-Key` on `POST /v1/images/generations`, as payment APIs have it: a client that lost
its connection sends the same request again, with the same key, to any gateway, and gets the
same request (its answer, or 202 for `wait: false`), never a second generation.

Each key is claimed once, with a KV create (atomic across gateways) in `LEGO_IDEMPOTENCY`,
keyed by the caller's API key id and a hash of the Idempotency-Key, holding the request id it
names and a hash of the body. The same key with another body is refused (422): a key names one
request. Keys expire with the bucket's TTL (`request_record_ttl_s`, 24 h by default).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.gateway.errors import APIError
from services.gateway.records import bucket
from services.gateway.request_state import Owner
from shared import subjects
from shared.bus import Bus

KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII without spaces, as Stripe's keys


class IdempotencyKeys:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._kv: KeyValue | None = None

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("IdempotencyKeys.start() was not called")
        return self._kv

    async def start(self) -> None:
        self._kv = await bucket(self.bus, subjects.IDEMPOTENCY_BUCKET, self.bus.settings.request_record_ttl_s)

    async def claim(self, owner: Owner, key: str, body_hash: str, request_id: str) -> str | None:
        """Claim `key` for a new request `request_id`: None when claimed (run it), else the id
        of the request the key named first (answer that one). 422 when that request's body
        differs; 400 for a malformed key."""
        if not KEY_PATTERN.match(key):
            raise APIError(400, "invalid_idempotency_key", "Idempotency-Key must be 1-255 printable ASCII characters")
        kv_key = _kv_key(owner, key)
        value = json.dumps({"request_id": request_id, "body": body_hash}).encode()
        try:
            await self.kv.create(kv_key, value)
            return None
        except KeyWrongLastSequenceError:
            pass
        try:
            entry = await self.kv.get(kv_key)
        except KeyNotFoundError:  # forgotten between the two calls: claim it again
            await self.kv.put(kv_key, value)
            return None
        earlier = json.loads(entry.value or b"{}")
        if earlier.get("body") != body_hash:
            raise APIError(
                422,
                "idempotency_key_reused",
                "this Idempotency-Key was used with a different request body; use a new key for a new request",
            )
        return str(earlier["request_id"])

    async def forget(self, owner: Owner, key: str) -> None:
        """Let go of a claim whose request never started (refused: 429, 409, bad input), so a
        retry runs it."""
        with contextlib.suppress(Exception):
            await self.kv.delete(_kv_key(owner, key))


def body_hash(body: bytes | str) -> str:
    return hashlib.sha256(body.encode() if isinstance(body, str) else body).hexdigest()


def _kv_key(owner: Owner, key: str) -> str:
    return f"{owner.key_id or '_'}.{hashlib.sha256(key.encode()).hexdigest()[:40]}"
