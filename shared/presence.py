"""Replica presence: each model replica refreshes a key in a JetStream KV bucket with a TTL.

A replica that dies stops refreshing and its key expires, so "is anyone serving model X"
needs no cleanup and no polling of processes. The autoscaler's status lives the same way in a
second bucket: the gateway's `GET /v1/status` reads it, and it is gone when the autoscaler is.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue

from shared import bus_roles, subjects
from shared.bus import Bus
from shared.messages import AutoscalerStatus, ReplicaInfo

log = logging.getLogger("lego.presence")

BUCKET = subjects.PRESENCE_BUCKET
REFRESH_S = 2.0
TTL_S = 3 * REFRESH_S
STATUS_BUCKET = subjects.STATUS_BUCKET
STATUS_KEY = "status"
STATUS_TTL_S = 15.0


async def _bucket(bus: Bus, bucket: str, ttl_s: float) -> KeyValue:
    """A KV bucket, made when missing by a role that may (shared.bus_roles); any other role
    waits for it (the gateway, or `lego up` before it starts anyone, makes it)."""
    try:
        return await bus.js.key_value(bucket)
    except BucketNotFoundError:
        if not bus_roles.may_create_streams(bus.settings.nats_user):
            return await bus.wait_until_made(f"bucket {bucket}", lambda: bus.js.key_value(bucket))
        return await bus.create_bucket(bucket, ttl=ttl_s, history=1)


async def presence_bucket(bus: Bus) -> KeyValue:
    return await _bucket(bus, BUCKET, TTL_S)


async def ensure_buckets(bus: Bus) -> None:
    """The presence and autoscaler-status buckets exist (or, for a role that may not make
    them, once they do)."""
    await presence_bucket(bus)
    await _status_bucket(bus)


def presence_key(info: ReplicaInfo) -> str:
    return f"{info.kind}.{info.model_id}.{info.replica_id}"


async def announce_forever(bus: Bus, describe: Callable[[], ReplicaInfo], stop: asyncio.Event) -> None:
    """Refresh this replica's key (with its live state from `describe()`) until `stop` is set,
    then delete it, so a clean exit is seen at once and a crash within TTL_S."""
    kv = await presence_bucket(bus)
    key = presence_key(describe())
    while not stop.is_set():
        try:
            await kv.put(key, describe().model_dump_json().encode())
        except Exception as exc:
            log.warning("presence refresh failed: %s", exc)
        try:
            await asyncio.wait_for(stop.wait(), REFRESH_S)
        except TimeoutError:
            pass
    try:
        await kv.delete(key)
    except Exception:
        pass


async def live_replicas(bus: Bus) -> list[ReplicaInfo]:
    """Every replica whose key has not expired.

    Why not `kv.keys()`: nats-py lists keys through a new ephemeral consumer per call, and
    readiness probes, `/v1/models` and the autoscaler ask many times a second; the consumers
    pile up until the server refuses more ("maximum consumers limit reached"). The stream's
    own subject counts (one API request) and direct gets create nothing."""
    kv = await presence_bucket(bus)
    prefix = f"$KV.{BUCKET}."
    info = await bus.js.stream_info(subjects.kv_stream(BUCKET), subjects_filter=f"{prefix}>")
    replicas = []
    for subject in sorted((info.state.subjects or {}) if info.state else {}):
        try:
            entry = await kv.get(subject.removeprefix(prefix))
        except Exception:  # deleted (a replica that stopped) or expired meanwhile
            continue
        if entry.value:
            replicas.append(ReplicaInfo.model_validate_json(entry.value))
    return replicas


def process_rss_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 where unavailable): cheap enough per refresh."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


async def _status_bucket(bus: Bus) -> KeyValue:
    return await _bucket(bus, STATUS_BUCKET, STATUS_TTL_S)


async def publish_autoscaler_status(bus: Bus, status: AutoscalerStatus) -> None:
    """The autoscaler's latest view (expires STATUS_TTL_S after its last tick)."""
    kv = await _status_bucket(bus)
    await kv.put(STATUS_KEY, status.model_dump_json().encode())


async def autoscaler_status(bus: Bus) -> AutoscalerStatus | None:
    """The autoscaler's latest published status, or None when no autoscaler runs."""
    kv = await _status_bucket(bus)
    try:
        entry = await kv.get(STATUS_KEY)
    except Exception:  # KeyNotFoundError, or a key deleted by its TTL
        return None
    return AutoscalerStatus.model_validate_json(entry.value) if entry.value else None
