"""The UCX transport (optional extra: `pip install '.[ucx]'`, which brings `ucxx`).

What it adds over TCP: CUDA tensors go from the producer's device memory into the consumer's
without a host copy (UCX's cuda_ipc on one host, cuda_copy / RDMA across hosts), and RDMA NICs
are used where UCX finds them. On a CPU-only machine it runs over TCP.

Importing this module never imports ucxx: `ucx_installed()` only looks for the package, and the
library is loaded by the first plane that needs it (`RUNTIME.acquire`). ucx-py's `ucp` (archived,
no longer installable here) is used only when ucxx is missing and `ucp` happens to be present.

Wire protocol on one endpoint, one request at a time (UCX matches same-tag messages in order):
    consumer -> producer:  frame(request)            {"op": "get", "key", "token", "mode": "ucx"}
    producer -> consumer:  frame(reply), payload     reply as on TCP (protocol.py); payload is the
                                                     nbytes raw bytes when ok, else an empty message
    frame(obj) = one message of exactly FRAME bytes: the JSON, padded with spaces.
Because a payload message always follows the reply, the consumer posts its send and both receives
at once (the payload straight into its final buffer, sized from the ref) and the producer posts
both sends at once: a request costs one wake-up on each side, not one per message.
JSON and raw bytes only, as on TCP: a peer can send a wrong number, never code.

UCX configuration: environment variables `UCX_*` always win. Without them, a machine with no GPU
gets `TLS=tcp` + `RNDV_SCHEME=put_zcopy`; every machine gets `TCP_TX_SEG_SIZE=64K`, which makes
large TCP messages zero-copy rendezvous instead of 8 KiB copy-in/copy-out fragments (measured on
the 2-core box at 64 MiB: 1.5 -> 4.3 GB/s). On a GPU machine UCX picks its transports itself
(cuda_copy, cuda_ipc, rc/ud/dc when there are RDMA NICs, tcp); to pin them set e.g.
`UCX_TLS=tcp,cuda_copy,cuda_ipc` (+ `rc` with InfiniBand/RoCE). ucxx's progress thread makes a
CUDA context on device 0 in every process that uses UCX on a GPU machine.

ucxx's listener takes a port only and listens on every interface (unlike the TCP server, which
binds `tensor_bind`): as on every transport, the per-tensor token is what protects a tensor.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from shared.tensor_plane.protocol import decode_header, encode_header, parse_uri
from shared.tensor_plane.server import answer
from shared.tensor_plane.stats import TransferStats
from shared.tensor_plane.store import StoredTensor, TensorStore

log = logging.getLogger("lego.tensor_plane.ucx")

INSTALL_HINT = "pip install '.[ucx]'  (installs ucxx-cu12)"
FRAME = 1024  # bytes of every request/reply message: one small eager message each way
Reply = tuple[dict[str, Any], Any]


class UcxUnavailable(RuntimeError):
    """UCX was asked for but cannot be used here (ucxx not installed or failing to load)."""


def ucx_installed() -> bool:
    """Whether ucxx (or the older ucx-py, `ucp`) is installed; does not import it."""
    for name in ("ucxx", "ucp"):
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except (ImportError, ValueError):
            continue
    return False


def cuda_present() -> bool:
    """Whether this process can use a GPU, without importing torch when it is not loaded yet.

    Services import torch (to load models) before they start their plane, so they get torch's
    answer; torch-free processes (the gateway) answer from the device nodes.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            return bool(torch.cuda.is_available())
        except Exception:
            return False
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/dxg")


def default_options(cuda: bool) -> dict[str, str]:
    """UCX options (without the `UCX_` prefix) used unless the environment sets them."""
    options = {"TCP_TX_SEG_SIZE": "64K"}
    if not cuda:
        options.update(TLS="tcp", RNDV_SCHEME="put_zcopy")
    return options


class UcxRuntime:
    """The process's one UCX context (ucxx keeps a single one per process), shared by its planes.

    `acquire` (on the event loop that will use UCX) loads the library, initialises the context
    once with a progress thread and ucxx's notifier thread (so a pending send/recv is woken by UCX
    rather than by a busy `asyncio.sleep(0)` loop: 64 MiB at 4.5 vs 2.2 GB/s on 2 cores; ucxx's
    thread-free "blocking" mode spins a core even when idle), and counts users.
    The last `release` resets the context, which stops UCX's threads: the process can exit and a
    later user on another loop starts clean. A safety net stops the notifier thread at interpreter
    shutdown if a plane was never closed (that thread is not a daemon and would block exit).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exit_hook = False
        self.lib: ModuleType | None = None
        self.transports: frozenset[str] = frozenset()

    @property
    def cuda(self) -> bool:
        """Whether UCX has a CUDA transport here, i.e. device buffers can be sent and received."""
        return "cuda_copy" in self.transports or "cuda_ipc" in self.transports

    @property
    def users(self) -> int:
        return self._users

    def acquire(self) -> ModuleType:
        """Load and initialise UCX for the running loop; raises UcxUnavailable when it cannot."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._users and loop is not self._loop:
                raise UcxUnavailable("UCX is already in use by this process on another event loop")
            if self._users == 0:
                self._start(loop)
            self._users += 1
            assert self.lib is not None
            return self.lib

    def release(self) -> None:
        """Drop one user; the last one tears UCX down (threads stopped, context freed)."""
        with self._lock:
            if self._users == 0:
                return
            self._users -= 1
            if self._users:
                return
            lib, self._loop = self.lib, None
        if lib is None:
            return
        try:
            lib.reset()  # joins ucxx's notifier thread, which notices within its 1 s wait
        except Exception as exc:  # something still references the context: at least stop the thread
            log.debug("UCX reset failed (%s); stopping the notifier thread only", exc)
            _stop_notifier(lib)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        lib = self.lib or _import_backend()
        cuda = cuda_present()
        kwargs: dict[str, Any] = {"options": default_options(cuda), "env_takes_precedence": True}
        if lib.__name__ == "ucxx":
            kwargs.update(progress_mode="thread", enable_python_future=True)
        try:
            try:
                lib.init(**kwargs)
            except RuntimeError:  # "already initiated": an earlier user's reset failed
                try:
                    lib.reset()
                    lib.init(**kwargs)
                except Exception:
                    # Keep that context; its notifier thread was stopped: restart it on this loop
                    # (ucxx binds the thread to the loop running when it starts).
                    lib.core._get_ctx().start_notifier_thread()
        except Exception as exc:
            raise UcxUnavailable(f"UCX failed to initialise: {type(exc).__name__}: {exc}") from exc
        try:
            self.transports = frozenset(lib.get_active_transports())
        except Exception:
            self.transports = frozenset()
        self.lib, self._loop = lib, loop
        if not self._exit_hook:
            # threading's hook runs before non-daemon threads are joined; atexit would be too late.
            register = getattr(threading, "_register_atexit", atexit.register)
            register(self._at_exit)
            self._exit_hook = True
        log.debug("UCX %s up, transports %s", lib.__name__, sorted(self.transports))

    def _at_exit(self) -> None:
        if self.lib is not None and self._users:
            _stop_notifier(self.lib)


RUNTIME = UcxRuntime()


def _import_backend() -> ModuleType:
    # ucxx sets UCX_MEMTYPE_CACHE, which UCX >= 1.19 no longer knows and would warn about.
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    try:
        import ucxx

        return ucxx
    except Exception as exc:
        first = exc
    try:
        import ucp  # ucx-py, ucxx's archived predecessor

        return ucp
    except Exception:
        pass
    if isinstance(first, ImportError) and not ucx_installed():
        raise UcxUnavailable(f"the ucx transport needs ucxx, which is not installed: {INSTALL_HINT}") from first
    raise UcxUnavailable(f"ucxx is installed but failed to load ({type(first).__name__}: {first})") from first


def _stop_notifier(lib: ModuleType) -> None:
    stop = getattr(lib, "stop_notifier_thread", None)
    if stop is not None:
        with contextlib.suppress(Exception):
            stop()


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve a finished task's exception (one left behind after a failure would be logged)."""
    if not task.cancelled():
        task.exception()


def _ep_closed(ep: Any) -> bool:
    closed = ep.closed  # a property in ucxx, a method in ucx-py
    return bool(closed() if callable(closed) else closed)


def _abort(ep: Any) -> None:
    with contextlib.suppress(Exception):
        ep.abort()


_EMPTY = np.empty(0, dtype=np.uint8)  # the payload message of a refused request


def parse_ucx_uri(uri: str) -> tuple[str, int]:
    """(host, port) of a "ucx://host:port" uri."""
    return parse_uri(uri, scheme="ucx")


async def send_frame(ep: Any, obj: dict[str, Any]) -> None:
    """One JSON object as one fixed-size message (space-padded), so the receiver needs no length first."""
    body = encode_header(obj)
    if len(body) > FRAME:
        obj = {**obj, "error": str(obj.get("error", ""))[:256]} if "error" in obj else obj
        body = encode_header(obj)
        if len(body) > FRAME:
            raise ValueError(f"frame of {len(body)} bytes exceeds {FRAME}")
    frame = np.full(FRAME, ord(" "), dtype=np.uint8)
    frame[: len(body)] = np.frombuffer(body, dtype=np.uint8)
    await ep.send(frame)


async def recv_frame(ep: Any) -> dict[str, Any]:
    """One JSON frame; ValueError for a malformed one."""
    frame = np.empty(FRAME, dtype=np.uint8)
    await ep.recv(frame)
    return decode_header(frame.tobytes())


class UcxServer:
    """Serves reads of a `TensorStore` over a UCX listener (port 0: UCX picks a free one).

    Each connected consumer gets one handler task that answers its requests in turn. Device
    (CUDA) entries are sent from device memory when UCX has CUDA transports, else from a host copy.
    """

    def __init__(self, store: TensorStore, stats: TransferStats, runtime: UcxRuntime = RUNTIME) -> None:
        self._store = store
        self._stats = stats
        self._runtime = runtime
        self._listener: Any = None
        self._handlers: dict[asyncio.Task[Any], Any] = {}
        self._closing = False
        self.port: int | None = None

    async def start(self) -> int:
        """Listen (the runtime must be acquired); returns the port."""
        lib = self._runtime.lib
        if lib is None:
            raise UcxUnavailable("UCX runtime not acquired")
        self._listener = lib.create_listener(self._serve, port=0)
        self.port = int(self._listener.port)
        return self.port

    async def close(self) -> None:
        """Abort every connection, wait for the handlers to finish, then stop listening."""
        self._closing = True
        handlers = list(self._handlers.items())
        for _, ep in handlers:
            _abort(ep)  # their pending receives end with it: no need to cancel them (see UcxClient)
        if handlers:
            _, stuck = await asyncio.wait([t for t, _ in handlers], timeout=5.0)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*(t for t, _ in handlers), return_exceptions=True)
        self._handlers.clear()
        if self._listener is not None:
            # ucxx retires a handler one loop turn after it returns; closing before that logs a warning.
            wait = getattr(self._listener, "_wait_for_active_clients", None)
            if wait is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(wait(), 5.0)
            self._listener.close()
            self._listener = None

    async def _serve(self, ep: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._closing:
            _abort(ep)
            return
        self._handlers[task] = ep
        try:
            while True:
                try:
                    req = await recv_frame(ep)
                except Exception:  # the consumer closed its endpoint (or sent garbage): done
                    break
                reply, entry = answer(self._store, self._stats, req, ("ucx",))
                # Take the bytes now, before any await: a release in between must not change them.
                payload = self._payload(entry) if entry is not None and entry.nbytes else _EMPTY
                if callable(payload):
                    payload = await asyncio.to_thread(payload)
                await asyncio.gather(send_frame(ep, reply), ep.send(payload))  # posted in this order
                del payload
        except Exception as exc:  # endpoint failure mid-reply: the consumer sees it as lost
            log.debug("ucx connection ended: %s: %s", type(exc).__name__, exc)
        finally:
            self._handlers.pop(task, None)
            _abort(ep)

    def _payload(self, entry: StoredTensor) -> Any:
        """The buffer to send, or a function making it (a device-to-host copy, run off the loop)."""
        if entry.device_data is None:
            return entry.data
        if self._runtime.cuda:
            return entry.device_data  # sent from device memory
        return entry.host_view


class UcxClient:
    """Requests to producers' UCX listeners, with a small pool of idle endpoints per uri.

    An endpoint carries one request at a time; one that failed mid-reply is aborted, never
    reused (its message stream position is unknown).

    A caller that gives up (a timeout, a cancelled request) never cancels ucxx's pending
    operations: dropping a pending ucxx request on the event loop's thread cancels it under UCX's
    worker lock, which the progress thread may hold while it waits for the GIL (a hang seen in
    CI), and cancelling ucxx coroutines mid-connect crashed the process in a stress run. The
    exchange goes on in the background instead, its endpoint aborted (which ucxx cancels on its
    own thread) and never pooled again.
    """

    def __init__(self, runtime: UcxRuntime = RUNTIME, max_idle_per_uri: int = 4, connect_timeout_s: float = 10.0):
        self._runtime = runtime
        self._idle: dict[str, list[Any]] = {}
        self._max_idle = max_idle_per_uri
        self._connect_timeout_s = connect_timeout_s
        self._abandoned: set[asyncio.Task[Any]] = set()

    async def request(self, uri: str, req: dict[str, Any], expect_nbytes: int, alloc: Callable[[int], Any]) -> Reply:
        """One request/reply; an ok reply's payload is received into `alloc(nbytes)`.

        Retries once on a fresh endpoint when a pooled one turned out stale. Raises
        ConnectionError when the producer cannot be reached or breaks the protocol.
        """
        exchange = _Exchange(self, uri, req, expect_nbytes, alloc)
        task = asyncio.ensure_future(exchange.run())
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            exchange.abandon()
            self._abandoned.add(task)
            task.add_done_callback(self._abandoned.discard)
            task.add_done_callback(_consume)
            raise

    async def _acquire(self, uri: str) -> tuple[Any, bool]:
        idle = self._idle.get(uri)
        while idle:
            ep = idle.pop()
            if not _ep_closed(ep):
                return ep, True
            _abort(ep)
        host, port = parse_ucx_uri(uri)
        lib = self._runtime.lib
        if lib is None:
            raise ConnectionError("UCX runtime not acquired")
        connect = asyncio.ensure_future(lib.create_endpoint(host, port))
        try:
            ep = await asyncio.wait_for(asyncio.shield(connect), self._connect_timeout_s)
        except TimeoutError:
            connect.add_done_callback(_abort_result)  # the endpoint, if it ever comes, is not used
            raise ConnectionError(f"ucx connect to {uri} timed out") from None
        except Exception as exc:
            raise ConnectionError(f"ucx connect to {uri} failed: {type(exc).__name__}: {exc}") from exc
        return ep, False

    def _put_back(self, uri: str, ep: Any) -> None:
        idle = self._idle.setdefault(uri, [])
        if not _ep_closed(ep) and len(idle) < self._max_idle:
            idle.append(ep)
        else:
            _abort(ep)

    @property
    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    async def close(self) -> None:
        """Abort every idle endpoint and let abandoned exchanges end (their endpoints are aborted)."""
        for eps in self._idle.values():
            for ep in eps:
                _abort(ep)
        self._idle.clear()
        if self._abandoned:
            await asyncio.wait(list(self._abandoned), timeout=5.0)
        await asyncio.sleep(0)


class _Exchange:
    """One request/reply on a pooled or new endpoint; see `UcxClient` for why it is never cancelled."""

    def __init__(
        self, client: UcxClient, uri: str, req: dict[str, Any], expect_nbytes: int, alloc: Callable[[int], Any]
    ):
        self._client = client
        self._uri = uri
        self._req = req
        self._expect = expect_nbytes
        self._alloc = alloc
        self._ep: Any = None
        self._abandoned = False

    def abandon(self) -> None:
        """The caller is gone: abort the endpoint now (ending its transfers), never pool it."""
        self._abandoned = True
        if self._ep is not None:
            _abort(self._ep)

    async def run(self) -> Reply:
        client = self._client
        for attempt in range(2):
            ep, reused = await client._acquire(self._uri)
            self._ep = ep
            if self._abandoned:
                _abort(ep)
                raise ConnectionError("ucx request abandoned")
            sent = False
            try:
                payload = self._alloc(self._expect)
                # Posted in this order: UCX matches the reply frame, then the payload message.
                send = asyncio.ensure_future(send_frame(ep, self._req))
                reply_task = asyncio.ensure_future(recv_frame(ep))
                payload_task = asyncio.ensure_future(ep.recv(payload))
                for task in (send, reply_task, payload_task):
                    task.add_done_callback(_consume)
                await send
                sent = True
                reply = await reply_task
                await payload_task
                if not reply.get("ok"):
                    payload = None
                elif reply.get("nbytes") != self._expect:
                    raise ValueError(f"producer announced {reply.get('nbytes')} bytes, expected {self._expect}")
            except Exception as exc:
                _abort(ep)  # the still pending operations end with it, on ucxx's own thread
                if reused and not sent and attempt == 0 and not self._abandoned:
                    continue
                if isinstance(exc, ValueError):
                    raise ConnectionError(f"tensor protocol error over ucx: {exc}") from exc
                raise ConnectionError(f"ucx: {type(exc).__name__}: {exc}") from exc
            if self._abandoned:
                _abort(ep)
            else:
                client._put_back(self._uri, ep)
            return reply, payload
        raise AssertionError("unreachable")


def _abort_result(task: asyncio.Future[Any]) -> None:
    """Abort the endpoint a connect that nobody waits for any more produced."""
    if not task.cancelled() and task.exception() is None:
        _abort(task.result())
