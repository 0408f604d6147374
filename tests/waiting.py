"""Waiting on a condition with a deadline: the tests' one way to wait (never a fixed sleep)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float = 30.0, every_s: float = 0.1) -> T:
    """Poll `probe` until it returns something truthy, and return that; fail naming `what`."""
    give_up = time.monotonic() + timeout_s
    while True:
        got = probe()
        if got:
            return got
        assert time.monotonic() < give_up, f"timed out after {timeout_s:.0f}s waiting for {what}"
        time.sleep(every_s)


async def wait_for_async(what: str, probe: Callable[[], T | None], timeout_s: float = 60.0, every_s: float = 0.05) -> T:
    """`wait_for` inside a test's event loop (it keeps serving the bus while it waits)."""
    give_up = time.monotonic() + timeout_s
    while True:
        got = probe()
        if got:
            return got
        assert time.monotonic() < give_up, f"timed out after {timeout_s:.0f}s waiting for {what}"
        await asyncio.sleep(every_s)
