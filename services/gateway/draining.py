"""SIGTERM drains a gateway, so that a rolling update loses nothing: it stops taking requests
(`/healthz` and `/readyz` answer 503 `draining`, so a balancer routes away, and a new request
is refused with 503 and Retry-After), hands its running requests over (it stops driving them
and deletes its heartbeat: a survivor adopts them at its next beat, services/gateway/leases.py),
waits while its callers still connected get their answers (the adopters store them in the
records, which their waiters follow), then lets the server exit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from services.gateway.errors import APIError

log = logging.getLogger("lego.gateway")
RETRY_AFTER_S = 1


class Drain:
    def __init__(self) -> None:
        self.draining = False
        self._steps: Callable[[], Awaitable[None]] | None = None

    def install(self, steps: Callable[[], Awaitable[None]]) -> None:
        """What draining does (set by the app once it is connected)."""
        self._steps = steps

    def refuse_if_draining(self) -> None:
        if self.draining:
            raise APIError(
                503,
                "draining",
                "this gateway is shutting down; send the request to another",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )

    async def run(self) -> None:
        """Drain once (a second call returns at once)."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: refusing new requests, handing the running ones over")
        if self._steps is not None:
            try:
                await self._steps()
            except Exception:
                log.exception("draining failed; exiting anyway")
        await asyncio.sleep(0)
