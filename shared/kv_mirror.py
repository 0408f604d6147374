"""Follow a JetStream key-value bucket into memory: the API keys (gateway) and the LoRA registry
(gateways and denoisers) are each read on every request, so each process keeps a copy that
the bucket's watch keeps current.

Why one function: the watch has two phases that are easy to get subtly wrong. Until it has
caught up, entries are collected and then replace the copy at once, so a key deleted while the
process was away is dropped too. After that, each change is applied as it comes. A failed watch
(NATS away) is started again, from the bucket's current entries."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TypeVar

from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

log = logging.getLogger("lego.kv")
T = TypeVar("T")
REWATCH_S = 1.0  # after a watch fails, try again this often


async def follow(
    kv: KeyValue,
    bucket: str,
    parse: Callable[[bytes], T],
    replace: Callable[[dict[str, T]], None],
    apply: Callable[[str, T | None], None],
    loaded: asyncio.Future[None],
) -> None:
    """Mirror `kv` until cancelled: `replace(every entry)` once each watch has caught up (and
    `loaded` is set then, the first time), `apply(key, value or None when deleted)` for each
    change after. `parse` reads an entry's value (ValueError: the entry is skipped, logged)."""
    while True:
        try:
            await _watch(kv, bucket, parse, replace, apply, loaded)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("watching the %s bucket failed (%s); watching again", bucket, exc)
        await asyncio.sleep(REWATCH_S)


async def _watch(
    kv: KeyValue,
    bucket: str,
    parse: Callable[[bytes], T],
    replace: Callable[[dict[str, T]], None],
    apply: Callable[[str, T | None], None],
    loaded: asyncio.Future[None],
) -> None:
    watcher = await kv.watchall()
    fresh: dict[str, T] | None = {}  # this watch's entries until it has caught up
    try:
        async for entry in watcher:
            if entry is None:  # caught up: every stored entry is in
                replace(fresh or {})
                fresh = None
                if not loaded.done():
                    loaded.set_result(None)
                continue
            value = _value(entry, bucket, parse)
            if fresh is None:
                apply(entry.key, value)
            elif value is None:
                fresh.pop(entry.key, None)
            else:
                fresh[entry.key] = value
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()


def _value(entry: KeyValue.Entry, bucket: str, parse: Callable[[bytes], T]) -> T | None:
    if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
        return None
    try:
        return parse(entry.value)
    except ValueError:
        log.warning("ignoring a malformed entry %r in %s", entry.key, bucket)
        return None
