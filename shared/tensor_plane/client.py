"""The consumer's TCP client: pooled connections, payload received straight into its final buffer.

Each connection is an `asyncio.BufferedProtocol`, so the kernel copies the payload directly into
a preallocated (uninitialised) numpy buffer: one copy per byte, which is what makes 1 GiB reads
cheap. A connection carries one request at a time; idle ones are kept per uri for reuse.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from shared.tensor_plane.protocol import MAX_HEADER, decode_header, encode_header, parse_uri

Reply = tuple[dict[str, Any], "np.ndarray | None"]


class _Connection(asyncio.BufferedProtocol):
    """One client connection: header line into a scratch buffer, payload into the result."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._scratch = memoryview(bytearray(64 * 1024))
        self._header = bytearray()
        self._reply: dict[str, Any] | None = None
        self._payload: np.ndarray | None = None
        self._payload_view: memoryview | None = None
        self._pos = 0
        self._expect_nbytes: int | None = None  # None: no payload follows an ok reply
        self._waiter: asyncio.Future[Reply] | None = None
        self.lost = False

    # -- asyncio callbacks -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(ConnectionError(f"connection to producer lost: {exc}" if exc else "producer closed the connection"))

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._payload_view is not None:
            return self._payload_view[self._pos :]
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self._payload_view is not None:
            self._pos += nbytes
            if self._pos == len(self._payload_view):
                self._done()
            return
        if self._waiter is None:
            self._protocol_error("unsolicited bytes from producer")
            return
        self._header += self._scratch[:nbytes]
        end = self._header.find(b"\n")
        if end < 0:
            if len(self._header) > MAX_HEADER:
                self._protocol_error("reply header too long")
            return
        try:
            reply = decode_header(self._header[:end])
        except ValueError:
            self._protocol_error("malformed reply header")
            return
        rest = memoryview(self._header)[end + 1 :]
        self._reply = reply
        if reply.get("ok") and self._expect_nbytes is not None:
            n = reply.get("nbytes")
            if n != self._expect_nbytes:
                rest.release()
                self._protocol_error(f"producer announced {n} bytes, expected {self._expect_nbytes}")
                return
            if len(rest) > n:
                rest.release()
                self._protocol_error("producer sent more bytes than announced")
                return
            self._payload = np.empty(n, dtype=np.uint8)
            view = self._payload.data
            view[: len(rest)] = rest
            self._pos = len(rest)
            rest.release()
            self._header = bytearray()
            if self._pos == n:
                self._done()
            else:
                self._payload_view = view
            return
        extra = len(rest)
        rest.release()
        self._header = bytearray()
        if extra:
            self._protocol_error("unexpected bytes after reply header")
            return
        self._done()

    # -- internals ---------------------------------------------------------------------------
    def _done(self) -> None:
        reply, payload = self._reply or {}, self._payload
        self._reply, self._payload, self._payload_view, self._pos = None, None, None, 0
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result((reply, payload))

    def _fail(self, exc: Exception) -> None:
        self._reply, self._payload, self._payload_view, self._pos = None, None, None, 0
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    def _protocol_error(self, why: str) -> None:
        self.lost = True
        self._fail(ConnectionError(f"tensor protocol error: {why}"))
        if self.transport is not None:
            self.transport.close()

    @property
    def usable(self) -> bool:
        return not self.lost and self.transport is not None and not self.transport.is_closing()

    async def request(self, req: dict[str, Any], expect_nbytes: int | None) -> Reply:
        """Send one request; `expect_nbytes` is the payload size when an ok reply carries bytes."""
        if not self.usable:
            raise ConnectionError("connection is closed")
        assert self.transport is not None
        self._waiter = self._loop.create_future()
        self._expect_nbytes = expect_nbytes
        self._header = bytearray()
        self.transport.write(encode_header(req))
        try:
            return await self._waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


class TensorClient:
    """Requests to producers' tensor servers, with a small pool of idle connections per uri."""

    def __init__(self, max_idle_per_uri: int = 4, connect_timeout_s: float = 10.0) -> None:
        self._idle: dict[str, list[_Connection]] = {}
        self._max_idle = max_idle_per_uri
        self._connect_timeout_s = connect_timeout_s

    async def request(self, uri: str, req: dict[str, Any], expect_nbytes: int | None = None) -> Reply:
        """One request/reply. Retries once on a fresh connection if a pooled one turned out stale.

        Raises ConnectionError/OSError when the producer cannot be reached.
        """
        for attempt in range(2):
            conn, reused = await self._acquire(uri)
            try:
                reply = await conn.request(req, expect_nbytes)
            except ConnectionError:
                conn.close()
                if reused and attempt == 0:
                    continue
                raise
            except BaseException:
                conn.close()  # cancelled or timed out mid-reply: the stream position is unknown
                raise
            self._put_back(uri, conn)
            return reply
        raise AssertionError("unreachable")

    async def _acquire(self, uri: str) -> tuple[_Connection, bool]:
        idle = self._idle.get(uri)
        while idle:
            conn = idle.pop()
            if conn.usable:
                return conn, True
        host, port = parse_uri(uri)
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: _Connection(loop), host, port), self._connect_timeout_s
        )
        return conn, False

    def _put_back(self, uri: str, conn: _Connection) -> None:
        idle = self._idle.setdefault(uri, [])
        if conn.usable and len(idle) < self._max_idle:
            idle.append(conn)
        else:
            conn.close()

    async def close(self) -> None:
        """Close every idle connection."""
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let transports run their close callbacks
