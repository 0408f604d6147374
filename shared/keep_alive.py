"""Keeping a JetStream delivery in hand: `in_progress` well inside AckWait, so that a step a
replica holds (computing it, or held to serve next) is not redelivered to another."""

from __future__ import annotations

import asyncio
import contextlib

from nats.aio.msg import Msg

from shared.settings import Settings


def keep_alive_s(settings: Settings) -> float:
    """How often to say so: a third of AckWait (two chances to miss before it runs out)."""
    return max(0.2, settings.ack_wait_s / 3)


class KeepAlive:
    """Tells JetStream, well inside AckWait, that a step is still in hand, until cancelled.

    A timer rather than a task: most steps end long before the first tick, and a task a step
    (started, then cancelled) cost two event-loop turns each on the bus's hottest path."""

    def __init__(self, msg: Msg, interval_s: float) -> None:
        self._msg = msg
        self._interval_s = interval_s
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(interval_s, self._tick)
        self._sending: asyncio.Task[None] | None = None

    def _tick(self) -> None:
        self._sending = self._loop.create_task(self._send())
        self._timer = self._loop.call_later(self._interval_s, self._tick)

    async def _send(self) -> None:
        with contextlib.suppress(Exception):
            await self._msg.in_progress()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
