"""Wire format of the tensor server: one JSON header line each way, then raw bytes.

Request:  {"op": "get", "key": ..., "token": ..., "mode": "tcp" | "shm"} + "\\n"
Reply:    {"ok": true, "nbytes": n} + "\\n" + n raw bytes              (mode tcp)
          {"ok": true, "nbytes": n, "shm": "<segment name>"} + "\\n"   (mode shm)
          {"ok": false, "code": "unavailable" | "no_shm" | "bad_request", "error": why} + "\\n"
JSON only, so a malicious peer can at worst send a wrong number, never code.
The UCX transport (ucx.py) carries the same request/reply objects in length-prefixed frames.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

MAX_HEADER = 64 * 1024
CHUNK = 4 * 1024 * 1024  # bytes per write before awaiting drain: bounds buffered copies


def encode_header(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def decode_header(line: bytes | bytearray) -> dict[str, Any]:
    """Parse one header line; ValueError when it is not a JSON object."""
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError("header is not a JSON object")
    return obj


def parse_uri(uri: str, scheme: str = "tcp") -> tuple[str, int]:
    """(host, port) of a "tcp://host:port" uri (or of another `scheme`, e.g. "ucx")."""
    parts = urlsplit(uri)
    if parts.scheme != scheme or not parts.hostname or parts.port is None:
        raise ValueError(f"bad tensor server uri {uri!r}; expected {scheme}://host:port")
    return parts.hostname, parts.port


def make_uri(scheme: str, host: str, port: int) -> str:
    """E.g. "tcp://127.0.0.1:40123"; IPv6 hosts go in brackets."""
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
