"""The producer's asyncio TCP server: checks key + token, then sends bytes or a segment name.

`answer` (the key + token check and the reply) is shared with the UCX server."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from shared.tensor_plane.errors import TensorUnavailable
from shared.tensor_plane.protocol import CHUNK, MAX_HEADER, decode_header, encode_header
from shared.tensor_plane.stats import TransferStats
from shared.tensor_plane.store import StoredTensor, TensorStore


class TensorServer:
    """Serves reads of a `TensorStore`. Connections are kept open for many requests, one at a time."""

    def __init__(self, store: TensorStore, stats: TransferStats, bind: str) -> None:
        self._store = store
        self._stats = stats
        self._bind = bind
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port: int | None = None

    async def start(self) -> int:
        """Listen on (bind, an ephemeral port); returns the port."""
        self._server = await asyncio.start_server(self._handle, host=self._bind, port=0, limit=MAX_HEADER)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        """Stop listening and drop open connections (3.11's Server.close leaves them open)."""
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        with contextlib.suppress(Exception):
            await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # header longer than MAX_HEADER
                    writer.write(encode_header({"ok": False, "code": "bad_request", "error": "header too long"}))
                    break
                if not line.endswith(b"\n"):
                    break  # EOF (a pooled client going away)
                reply, entry = self._answer(line)
                writer.write(encode_header(reply))
                if entry is not None:
                    # A CUDA tensor held on the device is copied to the host off the loop.
                    payload = entry.data if entry.device_data is None else await asyncio.to_thread(entry.host_view)
                    # Chunks + drain: memory stays bounded and nothing is copied more than once.
                    for off in range(0, len(payload), CHUNK):
                        writer.write(payload[off : off + CHUNK])
                        await writer.drain()
                    del payload
                else:
                    await writer.drain()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _answer(self, line: bytes) -> tuple[dict[str, Any], StoredTensor | None]:
        try:
            req = decode_header(line)
        except ValueError:
            return {"ok": False, "code": "bad_request", "error": "malformed request header"}, None
        return answer(self._store, self._stats, req, ("tcp", "shm"))


def answer(
    store: TensorStore, stats: TransferStats, req: dict[str, Any], modes: tuple[str, ...]
) -> tuple[dict[str, Any], StoredTensor | None]:
    """The reply to one request, and the entry whose bytes follow it (None: no payload).

    Shared by the TCP and UCX servers: the key + token check is the same on every transport.
    """
    mode = req.get("mode", modes[0])
    if req.get("op") != "get" or mode not in modes:
        return {
            "ok": False,
            "code": "bad_request",
            "error": f"unsupported op/mode {req.get('op')}/{mode}",
        }, None
    key = str(req.get("key", ""))
    try:
        entry = store.lookup(key, str(req.get("token", "")))
    except TensorUnavailable as exc:
        stats.add("refused", mode)
        return {"ok": False, "code": "unavailable", "error": exc.reason}, None
    if mode == "shm":
        if entry.shm_name is None:
            return {
                "ok": False,
                "code": "no_shm",
                "error": "producer holds this tensor outside shared memory",
            }, None
        stats.add("served", "shm", entry.nbytes)
        return {"ok": True, "nbytes": entry.nbytes, "shm": entry.shm_name}, None
    stats.add("served", mode, entry.nbytes)
    return {"ok": True, "nbytes": entry.nbytes}, entry
