"""`TensorPlane`: one object per service process that stores, serves and fetches tensors.

Producers `put` tensors (from any thread) and ship the returned `TensorRef` on the bus;
consumers `await get(ref)`. Small tensors ride inline in the ref; larger ones stay with the
producer and are pulled point to point: shared memory on the same host, TCP otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
from typing import Any, Self

import numpy as np

from shared.messages import TensorRef
from shared.settings import Settings
from shared.tensor_plane.client import TensorClient
from shared.tensor_plane.errors import TensorUnavailable
from shared.tensor_plane.raw import RawTensor
from shared.tensor_plane.server import TensorServer
from shared.tensor_plane.shm import host_identity, map_segment, shm_supported
from shared.tensor_plane.stats import TransferStats
from shared.tensor_plane.store import TensorStore

TRANSPORTS = ("auto", "tcp", "shm")


class TensorPlane:
    """Producer store + server and consumer client behind one facade.

    `put` and `release` are thread-safe; `start`, `get` and `close` run on the service's event loop.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings if settings is not None else Settings.from_env()
        transport = self.settings.transport
        if transport not in TRANSPORTS:
            raise ValueError(f"transport={transport!r}; expected one of {TRANSPORTS}")
        if transport == "shm" and not shm_supported():
            raise ValueError("transport=shm needs POSIX shared memory under /dev/shm (Linux)")
        self.host = host_identity()
        self._shm = transport in ("auto", "shm") and shm_supported()
        self._store = TensorStore(ttl_s=self.settings.tensor_ttl_s, use_shm=self._shm)
        self._stats = TransferStats()
        self._server = TensorServer(self._store, self._stats, self.settings.tensor_bind)
        self._client = TensorClient()
        self._uri: str | None = None
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the tensor server on an ephemeral port and the TTL sweeper."""
        if self._uri is not None:
            return
        port = await self._server.start()
        host = self.settings.tensor_host
        self._uri = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def close(self) -> None:
        """Stop serving, close pooled connections and free every stored tensor (unlinks segments)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self._server.close()
        await self._client.close()
        self._store.clear()
        self._uri = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def uri(self) -> str:
        """Where consumers reach this process's tensor server, e.g. "tcp://127.0.0.1:40123"."""
        if self._uri is None:
            raise RuntimeError("TensorPlane not started: await plane.start() first")
        return self._uri

    @property
    def store(self) -> TensorStore:
        return self._store

    # -- producer ----------------------------------------------------------------------------
    def put(self, raw: RawTensor, owner: str) -> TensorRef:
        """Keep `raw` for `owner` (a request id) and return a ref to it. Thread-safe.

        Tensors up to `inline_max_bytes` are embedded in the ref and not stored at all.
        """
        if raw.nbytes <= max(self.settings.inline_max_bytes, 0):
            self._stats.add("put", "inline", raw.nbytes)
            return TensorRef(
                key=f"inline-{secrets.token_hex(6)}",
                dtype=raw.dtype,
                shape=list(raw.shape),
                nbytes=raw.nbytes,
                host=self.host,
                inline=base64.b64encode(raw.buffer()).decode("ascii"),
            )
        uri = self.uri
        entry = self._store.put(raw, owner)
        self._stats.add("put", "shm" if entry.segment is not None else "heap", raw.nbytes)
        return TensorRef(
            key=entry.key,
            dtype=raw.dtype,
            shape=list(raw.shape),
            nbytes=raw.nbytes,
            token=entry.token,
            uri=uri,
            host=self.host,
        )

    def release(self, owner: str) -> int:
        """Free every tensor put for `owner`; returns the count. Thread-safe."""
        return self._store.release(owner)

    def sweep(self) -> int:
        """Free expired tensors now (also done in the background); returns the count."""
        return self._store.sweep()

    # -- consumer ----------------------------------------------------------------------------
    async def get(self, ref: TensorRef, timeout_s: float | None = None) -> RawTensor:
        """Fetch the tensor `ref` points at. Raises TensorUnavailable when it cannot be had.

        Same host + shm allowed -> the producer's segment is mapped copy-on-write (zero-copy);
        else the bytes come over TCP. "auto" falls back to TCP when the segment is not mappable.
        The default timeout scales with size (30 s + 1 s per 100 MB).
        """
        if ref.inline is not None:
            data = bytearray(base64.b64decode(ref.inline))
            self._stats.add("fetched", "inline", len(data))
            return self._raw(ref, data)
        if not ref.uri:
            raise TensorUnavailable(ref.key, "reference has neither inline data nor a uri")
        mode = self._pick_mode(ref)
        limit = timeout_s if timeout_s is not None else 30.0 + ref.nbytes / 100e6
        try:
            async with asyncio.timeout(limit):
                if mode == "shm":
                    return await self._get_shm(ref, fallback=self.settings.transport == "auto")
                return await self._get_tcp(ref)
        except TensorUnavailable:
            raise
        except TimeoutError:
            raise TensorUnavailable(ref.key, f"timed out after {limit:.0f}s reading from {ref.uri}") from None
        except (OSError, ValueError) as exc:  # ConnectionError is an OSError
            raise TensorUnavailable(ref.key, f"producer {ref.uri} unreachable or misbehaving: {exc}") from exc

    def _pick_mode(self, ref: TensorRef) -> str:
        transport = self.settings.transport
        same_host = bool(ref.host) and ref.host == self.host
        if transport == "shm":
            if not same_host:
                raise TensorUnavailable(
                    ref.key, f"transport=shm but producer is on host {ref.host!r}, not {self.host!r}"
                )
            return "shm"
        if transport == "auto" and same_host and shm_supported():
            return "shm"
        return "tcp"

    async def _get_tcp(self, ref: TensorRef) -> RawTensor:
        req = {"op": "get", "key": ref.key, "token": ref.token, "mode": "tcp"}
        reply, payload = await self._client.request(ref.uri or "", req, expect_nbytes=ref.nbytes)
        if not reply.get("ok") or payload is None:
            raise TensorUnavailable(ref.key, f"refused by {ref.uri}: {reply.get('error', 'no reason given')}")
        self._stats.add("fetched", "tcp", ref.nbytes)
        return self._raw(ref, payload)

    async def _get_shm(self, ref: TensorRef, fallback: bool) -> RawTensor:
        req = {"op": "get", "key": ref.key, "token": ref.token, "mode": "shm"}
        reply, _ = await self._client.request(ref.uri or "", req)
        if not reply.get("ok"):
            if reply.get("code") == "no_shm" and fallback:
                self._stats.add("fallback", "shm->tcp")
                return await self._get_tcp(ref)
            raise TensorUnavailable(ref.key, f"refused by {ref.uri}: {reply.get('error', 'no reason given')}")
        name = str(reply.get("shm"))
        if reply.get("nbytes") != ref.nbytes:
            raise TensorUnavailable(ref.key, f"producer reports {reply.get('nbytes')} bytes, ref says {ref.nbytes}")
        try:
            view = map_segment(name, ref.nbytes)
        except (OSError, ValueError) as exc:
            if fallback:  # e.g. same kernel but a separate /dev/shm (containers)
                self._stats.add("fallback", "shm->tcp")
                return await self._get_tcp(ref)
            raise TensorUnavailable(ref.key, f"cannot map shared-memory segment {name}: {exc}") from exc
        self._stats.add("fetched", "shm", ref.nbytes)
        return self._raw(ref, view)

    @staticmethod
    def _raw(ref: TensorRef, data: bytearray | memoryview | np.ndarray) -> RawTensor:
        try:
            return RawTensor(data, ref.dtype, tuple(ref.shape))
        except ValueError as exc:
            raise TensorUnavailable(ref.key, f"bad reference: {exc}") from exc

    # -- introspection -----------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, Any]:
        """Counts and bytes put/served/fetched/refused per transport, plus what is held now."""
        out: dict[str, Any] = self._stats.snapshot()
        out["stored"] = {"count": self._store.count, "bytes": self._store.nbytes}
        return out

    async def _sweep_forever(self) -> None:
        interval = min(max(self._store.ttl_s / 4, 0.05), 30.0)
        while True:
            await asyncio.sleep(interval)
            self._store.sweep()
