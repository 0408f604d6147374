"""The LoRA registry: a JetStream KV bucket (`LEGO_LORAS`), one entry per LoRA name, mirrored in
each reader's memory by a watch on the bucket.

Why a bucket: LoRAs are registered and deleted while the mesh runs (`POST`/`DELETE /v1/loras`),
and every gateway must refuse a deleted name and accept a new one without a restart. Why the
name is the KV key: `kv.create` refuses an existing one, so a name is registered once (409).

A record carries where the file is (`path`, readable by every model service: a directory under
the state dir on one machine, a shared volume on a cluster) and its SHA-256. The gateway puts
both into each request's `LoraChoice`, so a denoiser needs no lookup to load it, and the
adapter's key in its caches is the name *and* the digest (`adapter_key`): a name deleted and
registered again with another file can never hit the old file's cached tensors. The built-in
tiny LoRAs (`shared.zoo.registry.LORAS`) are stored too, with no path: every service reads them
from its own zoo.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Literal

from nats.js.errors import BucketNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field

from shared import kv_mirror, subjects
from shared.bus import Bus
from shared.messages import LoraChoice
from shared.zoo.registry import LORAS

log = logging.getLogger("lego.loras")

BUCKET = subjects.LORAS_BUCKET
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
REWATCH_S = kv_mirror.REWATCH_S
Source = Literal["builtin", "path", "upload"]


class LoraExists(Exception):
    """A registration under a name the registry holds already."""


class LoraRecord(BaseModel):
    """One registered LoRA: which base it adapts and where its file is."""

    name: str
    base: str = Field(description="the denoiser model id it adapts (its `-lora` workflows take it)")
    source: Source = Field(description="builtin (the zoo's), path (registered from a path) or upload")
    path: str = Field(default="", description="the safetensors file every model service reads; empty for built-ins")
    sha256: str = Field(default="", description="the file's SHA-256; empty for built-ins")
    bytes: int = Field(default=0, description="the file's size")
    description: str = ""
    created: float = Field(default_factory=time.time)

    def choice(self, scale: float) -> LoraChoice:
        """What a request's denoise step carries to apply this LoRA at `scale`."""
        return LoraChoice(name=self.name, scale=scale, path=self.path, sha256=self.sha256)


def adapter_key(choice: LoraChoice) -> str:
    """The LoRA's key in a denoiser's caches (and its peft adapter name): its name for a built-in,
    name and digest for a registered file (a name registered again names new tensors)."""
    return f"{choice.name}-{choice.sha256[:16]}" if choice.sha256 else choice.name


def builtin_records() -> dict[str, LoraRecord]:
    return {
        n: LoraRecord(name=n, base=info.base, source="builtin", description=info.description, created=0.0)
        for n, info in LORAS.items()
    }


def lora_bases() -> list[str]:
    """The denoisers that take LoRAs: those the zoo has built-in LoRAs for (their loaders exist)."""
    return sorted({info.base for info in LORAS.values()})


class LoraRegistry:
    """The bucket and this process's copy of it. `start()` returns once the copy holds every
    stored LoRA; from then on it follows the bucket. `version` counts the changes seen (what
    a cached view of the registry, the OpenAPI document, compares against)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._kv: KeyValue | None = None
        self._records: dict[str, LoraRecord] = {}
        self._task: asyncio.Task[None] | None = None
        self.version = 0
        # Called with a LoRA's record when it is deleted (or registered again with another file).
        self.on_delete: list[Callable[[LoraRecord], None]] = []

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("LoraRegistry.start() was not called")
        return self._kv

    async def start(self, seed_builtins: bool = False) -> None:
        """Open (or, with `seed_builtins`, the gateway's role, make) the bucket and follow it."""
        try:
            self._kv = await self.bus.js.key_value(BUCKET)
        except BucketNotFoundError:
            if not seed_builtins:
                raise
            self._kv = await self.bus.create_bucket(BUCKET, history=1)
        if seed_builtins:
            for name, record in builtin_records().items():
                with contextlib.suppress(KeyWrongLastSequenceError):  # stored already
                    await self.kv.create(name, record.model_dump_json().encode())
        loaded = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._follow(loaded), name="loras-watch")
        await loaded

    def follow_in_background(self) -> None:
        """For a reader that may not make the bucket (a denoiser): wait for it, then follow it.
        Never raises: a reader without the registry only frees deleted LoRAs later (by LRU)."""
        self._task = asyncio.create_task(self._open_then_follow(), name="loras-watch")

    async def _open_then_follow(self) -> None:
        warned = False
        while self._kv is None:
            try:
                self._kv = await self.bus.js.key_value(BUCKET)
            except Exception as exc:  # not made yet (the gateway makes it), or NATS away
                if not warned:
                    log.info("waiting for the %s bucket (%s)", BUCKET, exc)
                    warned = True
                await asyncio.sleep(REWATCH_S)
        await self._follow(asyncio.get_running_loop().create_future())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- reading: from memory --------------------------------------------------------------

    def get(self, name: str) -> LoraRecord | None:
        return self._records.get(name)

    def records(self) -> list[LoraRecord]:
        return sorted(self._records.values(), key=lambda r: (r.created, r.name))

    def names_for(self, base: str) -> list[str]:
        """Every LoRA of a base model: built-ins first, then by registration time."""
        return [r.name for r in self.records() if r.base == base]

    # -- writing: to the bucket (and at once to this process's copy) ------------------------

    async def register(self, record: LoraRecord) -> None:
        """Store a new LoRA; LoraExists if the name is taken."""
        try:
            await self.kv.create(record.name, record.model_dump_json().encode())
        except KeyWrongLastSequenceError as exc:
            raise LoraExists(record.name) from exc
        self._apply(record.name, record)

    async def delete(self, name: str) -> LoraRecord | None:
        """Delete a LoRA (every gateway refuses it once the delete reaches it); its record or None."""
        record = self._records.get(name)
        if record is None:
            return None
        await self.kv.delete(name)
        self._apply(name, None)
        return record

    # -- following the bucket ----------------------------------------------------------------

    def _apply(self, name: str, record: LoraRecord | None) -> None:
        old = self._records.pop(name, None)
        if record is not None:
            self._records[name] = record
        if old != record:
            self.version += 1
        if old is not None and (record is None or record.sha256 != old.sha256):
            for callback in self.on_delete:
                callback(old)

    def _replace(self, stored: dict[str, LoraRecord]) -> None:
        """A watch caught up: the copy becomes the bucket's entries (deletes missed included)."""
        for name in set(self._records) - set(stored):
            self._apply(name, None)
        for name, record in stored.items():
            self._apply(name, record)

    async def _follow(self, loaded: asyncio.Future[None]) -> None:
        await kv_mirror.follow(self.kv, BUCKET, LoraRecord.model_validate_json, self._replace, self._apply, loaded)
