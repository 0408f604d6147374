"""How much a key may ask for: its generation rate, its requests in flight, its priority cap.
Every refusal is an APIError in the gateway's error shape; 429s carry `Retry-After`.

The rate is counted by each gateway on its own (a token bucket in memory, per key): behind N
gateway replicas a key may reach up to N times its rate. Sharing the count would put a NATS
round trip in front of every request; a per-replica cap already stops a runaway client.
"""

from __future__ import annotations

import math
import time

from services.gateway.errors import APIError
from services.gateway.keys.model import KeyRecord

SECONDS_PER_MIN = 60.0
IN_FLIGHT_RETRY_S = 1  # a slot frees when one of the key's requests ends: no way to know when


class RateLimiter:
    """A token bucket per key: up to `rate_per_min` requests at once, refilled at that rate."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, at monotonic time)

    def take(self, key: KeyRecord, now: float | None = None) -> None:
        """Spend one of `key`'s requests, or raise a 429 saying when the next one is due."""
        rate = key.rate_per_min
        if rate <= 0:
            return
        now = time.monotonic() if now is None else now
        tokens, then = self._buckets.get(key.key_id, (float(rate), now))
        tokens = min(float(rate), tokens + (now - then) * rate / SECONDS_PER_MIN)
        if tokens < 1.0:
            self._buckets[key.key_id] = (tokens, now)
            wait = math.ceil((1.0 - tokens) * SECONDS_PER_MIN / rate)
            raise APIError(
                429,
                "rate_limited",
                f"API key {key.name!r} may make {rate} generation requests a minute; retry in {wait}s",
                headers={"Retry-After": str(wait)},
            )
        self._buckets[key.key_id] = (tokens - 1.0, now)


def check_in_flight(key: KeyRecord, running: int) -> None:
    """429 when `key` already has its quota of requests running (`running` of them)."""
    if key.max_in_flight and running >= key.max_in_flight:
        raise APIError(
            429,
            "too_many_in_flight",
            f"API key {key.name!r} may have {key.max_in_flight} requests running at once and has {running}; "
            "retry when one ends",
            headers={"Retry-After": str(IN_FLIGHT_RETRY_S)},
        )


def check_priority(key: KeyRecord, priority: int) -> None:
    """403 when the request asks for a priority above the key's cap."""
    if priority > key.max_priority:
        raise APIError(
            403,
            "priority_not_allowed",
            f"priority {priority} is above API key {key.name!r}'s max priority {key.max_priority}; "
            f"send priority 0-{key.max_priority} or ask an admin for a key with a higher cap",
        )
