"""Wire format of the tensor server: one JSON header line each way, then raw bytes.

Request:  {"op": "get", "key": ..., "token": ..., "mode": "tcp" | "shm"} + "\\n"
Reply:    {"ok": true, "nbytes": n} + "\\n" + n raw bytes              (mode tcp)
          {"ok": true, "nbytes": n, "shm": "<segment name>"} + "\\n"   (mode shm)
          {"ok": false, "code": "unavailable" | "no_shm" | "bad_request", "error": why} + "\\n"
JSON only, so a malicious peer can at worst send a wrong number, never code.
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


def parse_uri(uri: str) -> tuple[str, int]:
    """(host, port) of a "tcp://host:port" uri."""
    parts = urlsplit(uri)
    if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
        raise ValueError(f"bad tensor server uri {uri!r}; expected tcp://host:port")
    return parts.hostname, parts.port
