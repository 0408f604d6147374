"""`TensorPlane`: one object per service process that stores, serves and fetches tensors.

Producers `put` tensors (from any thread) and ship the returned `TensorRef` on the bus;
consumers `await get(ref)`. Small tensors ride inline in the ref; larger ones stay with the
producer and are pulled point to point: shared memory on the same host, TCP otherwise, UCX
(optional extra) for tensors on a GPU. `put_tensor`/`get_tensor` take and give torch tensors
and keep a GPU tensor in device memory from producer to GPU consumer when UCX is there.

Transport choice per read (`settings.transport`):
  auto: inline if it fits; a CUDA tensor whose producer and consumer both offer UCX -> ucx
        (into device memory for a GPU consumer; UCX uses CUDA IPC on one host); else same host
        -> shm (zero-copy map, faster than UCX over TCP for host tensors: bench/RESULTS.md);
        else tcp.
  tcp | shm | ucx: that transport for every pair (an error when it cannot be used).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from shared import tracing
from shared.messages import TensorRef
from shared.settings import Settings
from shared.tensor_plane import ucx
from shared.tensor_plane.client import TensorClient
from shared.tensor_plane.errors import TensorUnavailable
from shared.tensor_plane.protocol import make_uri
from shared.tensor_plane.raw import RawTensor
from shared.tensor_plane.server import TensorServer
from shared.tensor_plane.shm import host_identity, map_segment, shm_supported
from shared.tensor_plane.stats import TransferStats
from shared.tensor_plane.store import TensorStore

if TYPE_CHECKING:
    import torch

TRANSPORTS = ("auto", "tcp", "shm", "ucx")
UCX_MODES = ("auto", "on", "off")
log = logging.getLogger("lego.tensor_plane")


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
        ucx_mode = str(self.settings.ucx_enabled).lower()
        if ucx_mode not in UCX_MODES:
            raise ValueError(f"ucx_enabled={ucx_mode!r}; expected one of {UCX_MODES}")
        if transport == "ucx":
            if ucx_mode == "off":
                raise ValueError("transport=ucx contradicts ucx_enabled=off")
            if not ucx.ucx_installed():
                raise ValueError(f"transport=ucx needs the optional UCX extra: {ucx.INSTALL_HINT}")
        # Offer UCX (a listener, refs carrying ucx_uri): forced, or in auto mode where it pays off.
        self._ucx_wanted = transport == "ucx" or (
            transport == "auto"
            and ucx_mode != "off"
            and ucx.ucx_installed()
            and (ucx_mode == "on" or ucx.cuda_present())
        )
        self.host = host_identity()
        self._shm = transport in ("auto", "shm") and shm_supported()
        self._store = TensorStore(ttl_s=self.settings.tensor_ttl_s, use_shm=self._shm)
        self._stats = TransferStats()
        self._server = TensorServer(self._store, self._stats, self.settings.tensor_bind)
        self._client = TensorClient()
        self._uri: str | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._ucx_runtime: ucx.UcxRuntime | None = None  # held (acquired) while UCX is in use
        self._ucx_server: ucx.UcxServer | None = None
        self._ucx_client: ucx.UcxClient | None = None
        self._ucx_uri: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the tensor server (and the UCX listener when offered) on ephemeral ports, and the TTL sweeper.

        With transport=ucx a UCX that cannot start is an error (UcxUnavailable, a RuntimeError);
        in auto mode it is logged and the plane runs without UCX.
        """
        if self._uri is not None:
            return
        port = await self._server.start()
        self._uri = make_uri("tcp", self.settings.tensor_host, port)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())
        if self._ucx_wanted:
            try:
                await self._start_ucx()
            except ucx.UcxUnavailable as exc:
                if self.settings.transport == "ucx":
                    await self.close()
                    raise
                self._ucx_wanted = False
                log.warning("UCX not available, tensors go over shm/tcp: %s", exc)

    async def _start_ucx(self) -> None:
        self._ensure_ucx_client()
        server = ucx.UcxServer(self._store, self._stats)
        port = await server.start()
        self._ucx_server = server
        self._ucx_uri = make_uri("ucx", self.settings.tensor_host, port)

    def _ensure_ucx_client(self) -> ucx.UcxClient:
        """Acquire the process's UCX runtime for this plane (once) and make the client.

        Raises UcxUnavailable when UCX cannot start.
        """
        if self._ucx_client is None:
            ucx.RUNTIME.acquire()
            self._ucx_runtime = ucx.RUNTIME
            self._ucx_client = ucx.UcxClient()
        return self._ucx_client

    def _ucx_usable(self) -> bool:
        """In auto mode: whether this plane can use UCX now (a failure turns UCX off for it)."""
        if not self._ucx_wanted:
            return False
        try:
            self._ensure_ucx_client()
        except ucx.UcxUnavailable as exc:
            self._ucx_wanted = False
            log.warning("UCX not available, tensors go over shm/tcp: %s", exc)
            return False
        return True

    async def close(self) -> None:
        """Stop serving, close pooled connections and free every stored tensor (unlinks segments)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._ucx_server is not None:
            await self._ucx_server.close()
            self._ucx_server = None
        if self._ucx_client is not None:
            await self._ucx_client.close()
            self._ucx_client = None
        await self._server.close()
        await self._client.close()
        self._store.clear()
        self._uri = self._ucx_uri = None
        if self._ucx_runtime is not None:
            self._ucx_runtime.release()  # the last user stops UCX's threads
            self._ucx_runtime = None

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
    def ucx_uri(self) -> str | None:
        """Where consumers reach this process over UCX ("ucx://host:port"), None when not offered."""
        return self._ucx_uri

    @property
    def store(self) -> TensorStore:
        return self._store

    # -- producer ----------------------------------------------------------------------------
    def put(self, raw: RawTensor, owner: str) -> TensorRef:
        """Keep `raw` for `owner` (a request id) and return a ref to it. Thread-safe.

        Tensors up to `inline_max_bytes` are embedded in the ref and not stored at all.
        """
        tracing.event("tensor.put", {"tensor.bytes": raw.nbytes})
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
            ucx_uri=self._ucx_uri,
        )

    def put_tensor(self, t: torch.Tensor, owner: str) -> TensorRef:
        """`put` for a torch tensor. Thread-safe.

        A CUDA tensor stays in device memory (a private device copy) when this plane offers UCX,
        so a GPU consumer receives it device to device; its ref has device "cuda:N". Otherwise,
        and for tensors small enough to ride inline, the bytes go to the host as with `put`.
        """
        from shared.tensor_plane import torch_codec

        nbytes = t.numel() * t.element_size()
        if not t.is_cuda or self._ucx_uri is None or nbytes <= max(self.settings.inline_max_bytes, 0):
            return self.put(torch_codec.to_raw(t), owner)
        name = torch_codec.dtype_name(t)
        flat = torch_codec.device_bytes(t)
        uri = self.uri
        entry = self._store.put_device(
            flat, name, tuple(t.shape), nbytes, str(flat.device), lambda: flat.cpu().numpy(), owner
        )
        self._stats.add("put", "cuda", nbytes)
        return TensorRef(
            key=entry.key,
            dtype=name,
            shape=list(t.shape),
            nbytes=nbytes,
            token=entry.token,
            uri=uri,
            host=self.host,
            device=entry.device,
            ucx_uri=self._ucx_uri,
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
        UCX (see the module doc) receives into host memory here; `get_tensor` can receive on a GPU.
        The default timeout scales with size (30 s + 1 s per 100 MB).
        """
        if ref.inline is not None:
            data = bytearray(base64.b64decode(ref.inline))
            self._stats.add("fetched", "inline", len(data))
            return self._raw(ref, data)
        if not ref.uri and not ref.ucx_uri:
            raise TensorUnavailable(ref.key, "reference has neither inline data nor a uri")
        mode = self._pick_mode(ref)
        if mode == "ucx":
            buf = await self._read(ref, "ucx", timeout_s, lambda: self._get_ucx(ref, _host_buffer))
            return self._raw(ref, buf)
        if mode == "shm":
            return await self._read(
                ref, "shm", timeout_s, lambda: self._get_shm(ref, fallback=self.settings.transport == "auto")
            )
        return await self._read(ref, "tcp", timeout_s, lambda: self._get_tcp(ref))

    async def get_tensor(self, ref: TensorRef, device: str = "cpu", timeout_s: float | None = None) -> torch.Tensor:
        """`get` as a torch tensor on `device` ("cpu", "cuda", "cuda:1", "auto").

        For a GPU consumer, a tensor whose producer holds it on a GPU (ref.device "cuda:N") comes
        over UCX straight into device memory (no host copy) when both sides offer UCX and UCX
        has CUDA transports here; with transport=ucx every tensor does. Anything else is read
        as bytes (inline, shm, tcp) and copied to `device`.
        """
        import torch

        from shared.tensor_plane import torch_codec

        target = torch.device(torch_codec.resolve_device(device))
        if target.type == "cuda" and self._ucx_to_device(ref):
            if target.index is None:
                target = torch.device("cuda", torch.cuda.current_device())

            def alloc(n: int) -> torch.Tensor:
                return torch.empty(n, dtype=torch.uint8, device=target)

            flat = await self._read(ref, "ucx", timeout_s, lambda: self._get_ucx(ref, alloc))
            return torch_codec.from_device_bytes(flat, ref.dtype, ref.shape)
        t = torch_codec.from_raw(await self.get(ref, timeout_s))
        return t if target.type == "cpu" else t.to(target)

    def _ucx_to_device(self, ref: TensorRef) -> bool:
        """Whether `ref` can be received over UCX into device memory here."""
        if ref.inline is not None or not ref.nbytes or not ref.ucx_uri:
            return False
        transport = self.settings.transport
        if transport == "ucx":
            try:
                self._ensure_ucx_client()
            except ucx.UcxUnavailable:
                return False  # `get` then reports it as TensorUnavailable
        elif transport != "auto" or not ref.device.startswith("cuda") or not self._ucx_usable():
            return False
        return self._ucx_runtime is not None and self._ucx_runtime.cuda

    async def _read(self, ref: TensorRef, mode: str, timeout_s: float | None, fetch: Callable[[], Any]) -> Any:
        """Run one fetch under the read timeout, mapping transport failures to TensorUnavailable."""
        limit = timeout_s if timeout_s is not None else 30.0 + ref.nbytes / 100e6
        where = ref.ucx_uri if mode == "ucx" else ref.uri
        try:
            with tracing.transfer("pull", mode, ref.nbytes, where or ""):  # a `tensor.pull` span when tracing
                async with asyncio.timeout(limit):
                    return await fetch()
        except TensorUnavailable:
            raise
        except TimeoutError:
            raise TensorUnavailable(ref.key, f"timed out after {limit:.0f}s reading from {where}") from None
        except (OSError, ValueError, ucx.UcxUnavailable) as exc:  # ConnectionError is an OSError
            raise TensorUnavailable(ref.key, f"producer {where} unreachable or misbehaving: {exc}") from exc

    def _pick_mode(self, ref: TensorRef) -> str:
        transport = self.settings.transport
        same_host = bool(ref.host) and ref.host == self.host
        if transport == "ucx":
            if not ref.ucx_uri:
                raise TensorUnavailable(
                    ref.key, f"transport=ucx but producer {ref.uri} offers no UCX endpoint (is ucxx installed there?)"
                )
            return "ucx"
        if not ref.uri:
            raise TensorUnavailable(ref.key, f"transport={transport} but the producer offers UCX only")
        if transport == "auto" and ref.ucx_uri and ref.device.startswith("cuda") and self._ucx_usable():
            return "ucx"
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

    async def _get_ucx(self, ref: TensorRef, alloc: Callable[[int], Any]) -> Any:
        client = self._ensure_ucx_client()
        req = {"op": "get", "key": ref.key, "token": ref.token, "mode": "ucx"}
        reply, payload = await client.request(ref.ucx_uri or "", req, ref.nbytes, alloc)
        if not reply.get("ok") or payload is None:
            raise TensorUnavailable(ref.key, f"refused by {ref.ucx_uri}: {reply.get('error', 'no reason given')}")
        self._stats.add("fetched", "ucx", ref.nbytes)
        return payload

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


def _host_buffer(nbytes: int) -> np.ndarray:
    return np.empty(nbytes, dtype=np.uint8)
