"""Hostile bodies stopped at the door: a size limit (413) and a JSON nesting limit (400), checked
before any route or JSON parser sees the body.

Why a pure ASGI middleware and not a dependency: a route's body is parsed before its
dependencies run, so by then a 1 GB body is already in memory and a body nested 100 000 deep
has already sent `json.loads` into a RecursionError (a 500). Here the body is counted as it
streams in, so a chunked body without a Content-Length is cut off as soon as it passes the
limit, and its nesting is measured by a scan that never recurses. A body that passes is handed
on unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The deepest body the API takes is 3 levels ({"loras": [{"name": ...}]}); 32 leaves room for
# any future field while staying far below the depth where a recursive parser breaks.
MAX_JSON_DEPTH = 32
_JSON_SYNTAX = re.compile(rb'[\[\]{}"\\]')  # the only bytes that change depth or string state
_QUOTE, _BACKSLASH, _OPEN, _CLOSE = ord('"'), ord("\\"), b"[{", b"]}"


class BodyRefused(Exception):
    """A body the gateway will not read: its status, code and message for the error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class DepthScanner:
    """Tracks the nesting depth of a JSON text fed in chunks, without parsing it: brackets
    outside strings count, anything inside a string (escapes included) does not. Linear in the
    body and cheap on long strings (a base64 image): only the syntax bytes are visited."""

    def __init__(self, max_depth: int = MAX_JSON_DEPTH) -> None:
        self.max_depth = max_depth
        self.depth = 0
        self._in_string = False
        self._escape_next = False  # the last chunk ended on a backslash inside a string

    def feed(self, chunk: bytes) -> None:
        """Raise BodyRefused(400) as soon as the nesting passes `max_depth`."""
        if not chunk:
            return
        skip = 0 if self._escape_next else -1  # the position of an escaped byte
        self._escape_next = False
        for match in _JSON_SYNTAX.finditer(chunk):
            pos = match.start()
            if pos == skip:
                continue
            byte = chunk[pos]
            if self._in_string:
                if byte == _BACKSLASH:
                    skip = pos + 1
                    self._escape_next = skip == len(chunk)
                elif byte == _QUOTE:
                    self._in_string = False
            elif byte == _QUOTE:
                self._in_string = True
            elif byte in _OPEN:
                self.depth += 1
                if self.depth > self.max_depth:
                    message = f"request body nests deeper than {self.max_depth} levels; no API body needs that"
                    raise BodyRefused(400, "too_deep", message)
            elif byte in _CLOSE:
                self.depth -= 1


class BodyLimits:
    """ASGI middleware: refuse a body over `max_body_bytes` with 413 (by its Content-Length, or
    by counting the bytes as they arrive) and one nested deeper than MAX_JSON_DEPTH with 400,
    in the gateway's error shape, before the app reads it."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._check_length_header(scope)
            body, more = await self._read(receive, json_body=not _is_multipart(scope))
        except BodyRefused as exc:
            await _refuse(send, exc)
            return
        await self.app(scope, _replay(body, more, receive), send)

    def _check_length_header(self, scope: Scope) -> None:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise BodyRefused(400, "invalid_content_length", "Content-Length is not a number") from None
                if length > self.max_body_bytes:
                    raise BodyRefused(413, "body_too_large", self._too_large())

    async def _read(self, receive: Receive, json_body: bool = True) -> tuple[bytes, Message | None]:
        """The whole body, counted and scanned as it streams in (a multipart form, `json_body`
        False, is counted only: its files are binary); and a non-body message (a disconnect)
        met on the way, to hand on to the app."""
        chunks: list[bytes] = []
        size = 0
        scanner = DepthScanner(self.max_depth)
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks), message
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyRefused(413, "body_too_large", self._too_large())
            if json_body:
                scanner.feed(chunk)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    def _too_large(self) -> str:
        return (
            f"request body is larger than the gateway's limit of {self.max_body_bytes} bytes "
            f"({self.max_body_bytes / 2**20:g} MiB, LEGO_MAX_BODY_BYTES)"
        )


def _is_multipart(scope: Scope) -> bool:
    """A multipart/form-data body (an image edit's): bytes, not JSON, so no nesting to measure."""
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return bytes(value).lower().startswith(b"multipart/form-data")
    return False


def _replay(body: bytes, pending: Message | None, receive: Receive) -> Receive:
    """A `receive` that gives the app the body read already, in one message, then defers to the
    real one (a streaming response listens on it for the client's disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent, pending
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if pending is not None:
            message, pending = pending, None
            return message
        return await receive()

    return replay


async def _refuse(send: Send, exc: BodyRefused) -> None:
    body = json.dumps({"error": {"code": exc.code, "message": exc.message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if exc.status == 413:
        headers.append((b"connection", b"close"))  # the rest of the body is not read
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
