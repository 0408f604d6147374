"""What an API key is: a name, a public id, the hash of its secret, what it may do (scopes) and
how much (rate, requests in flight, highest priority). JSON in the LEGO_KEYS bucket."""

from __future__ import annotations

import time
from enum import StrEnum

from pydantic import BaseModel, Field

from services.gateway.schemas import MAX_PRIORITY

NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # also the KV key: NATS allows these characters


class Scope(StrEnum):
    GENERATE = "generate"  # generate images, follow and cancel one's own requests, list workflows
    ADMIN = "admin"  # manage keys, see the mesh (models, replicas, scaling)


class KeyLimits(BaseModel):
    """What a key may do and how much; the body of `POST /v1/keys` beside its name."""

    scopes: list[Scope] = Field(default_factory=lambda: [Scope.GENERATE], min_length=1)
    rate_per_min: int = Field(60, ge=0, description="generation requests per minute, per gateway (0: no limit)")
    max_in_flight: int = Field(4, ge=0, description="generation requests running at once (0: no limit)")
    max_priority: int = Field(
        0, ge=0, le=MAX_PRIORITY, description="the highest `priority` its requests may ask for (0-9)"
    )


class KeyInfo(KeyLimits):
    """A key as `GET /v1/keys` shows it: never the key, never its hash."""

    key_id: str
    name: str
    created: float = Field(default_factory=time.time)


class KeyRecord(KeyInfo):
    """A key as the store keeps it: its info and the SHA-256 of its secret."""

    hash: str
    revoked: bool = False

    def info(self) -> KeyInfo:
        return KeyInfo.model_validate(self.model_dump(exclude={"hash", "revoked"}))

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes


# Who calls when auth is off (`lego up --no-auth`): every scope, no limits, no owner.
ANONYMOUS = KeyRecord(
    key_id="",
    name="anonymous",
    hash="",
    scopes=list(Scope),
    rate_per_min=0,
    max_in_flight=0,
    max_priority=MAX_PRIORITY,
    created=0.0,
)
