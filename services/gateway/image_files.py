"""Images answered as links (`response_format: "url"`): kept by the gateway for a while and
served at `GET /v1/images/files/{file_id}`, as OpenAI and SGLang answer `url`.

Choices, and why:
- In memory, bounded in bytes (LEGO_IMAGE_URL_MAX_MB), the oldest dropped first when full. A
  link lives an hour by default (LEGO_IMAGE_URL_TTL_S), and images are small (a 1024x1024 PNG
  is at most about 3 MB); the gateway already holds async results in memory the same way (served
  by the gateway that made them). A disk directory would survive a restart, but would add disk
  writes to every answer, files to clean after a crash, and images at rest on disk.
- No API key to fetch one: a link is handed to browsers, `<img>` tags and other services that
  cannot send the key. Its random token (192 bits) is the capability, as with OpenAI's and
  SGLang's links; it expires, and the gateway never lists them.
- The expiry is written into the id, so a link fetched after it expired answers 404 saying so,
  without the gateway remembering expired links.
"""

from __future__ import annotations

import base64
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from services.gateway.encoding import OutputFormat
from services.gateway.errors import APIError
from services.gateway.schemas import ImageData

FILES_PATH = "/v1/images/files"
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_TOKEN_BYTES = 24  # 192 random bits: not guessable


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    media_type: str
    expires: float  # wall-clock seconds

    def max_age(self, now: float) -> int:
        """Whole seconds a cache may keep it."""
        return max(0, int(self.expires - now))


class ImageFiles:
    """The images behind links: `put` keeps one and names it, `get` finds it or says why not.

    At most `max_bytes` are held (one image larger than that alone is still kept, by itself):
    the oldest go first, and every call drops the expired. `clock` is wall time (the expiry is
    shown to users); tests pass their own."""

    def __init__(self, ttl_s: float, max_bytes: int, clock: Callable[[], float] = time.time) -> None:
        if ttl_s <= 0 or max_bytes <= 0:
            raise ValueError(f"image links need a positive lifetime and store size; got {ttl_s} s, {max_bytes} bytes")
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.clock = clock
        self._files: OrderedDict[str, StoredImage] = OrderedDict()
        self._bytes = 0

    @property
    def bytes_held(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._files)

    def put(self, data: bytes, fmt: OutputFormat) -> str:
        """Keep an encoded image; its file id (random token, expiry, extension)."""
        now = self.clock()
        self._drop_expired(now)
        while self._files and self._bytes + len(data) > self.max_bytes:
            self._drop_oldest()
        expires = now + self.ttl_s
        file_id = f"{secrets.token_urlsafe(_TOKEN_BYTES)}-{math.ceil(expires)}.{fmt}"
        self._files[file_id] = StoredImage(data, MEDIA_TYPES[fmt], expires)
        self._bytes += len(data)
        return file_id

    def get(self, file_id: str) -> StoredImage:
        """The image behind a link, or a 404 saying why it is not there (expired, or dropped)."""
        now = self.clock()
        self._drop_expired(now)
        stored = self._files.get(file_id)
        if stored is not None and stored.expires > now:
            return stored
        raise APIError(404, "image_not_found", self._why_missing(file_id, now))

    def _why_missing(self, file_id: str, now: float) -> str:
        expires = _expiry_of(file_id)
        again = "generate it again, or ask response_format='b64_json' to get images inline"
        if expires is None:
            return f"no image {file_id!r} on this gateway: the link is not one it made; {again}"
        when = datetime.fromtimestamp(expires, UTC).isoformat(timespec="seconds")
        if expires <= now:
            return f"this image link expired at {when} (links live LEGO_IMAGE_URL_TTL_S={self.ttl_s:g} s); {again}"
        return (
            f"this image is gone before its expiry ({when}): the gateway that made the link restarted, another "
            f"gateway answered, or its image store (LEGO_IMAGE_URL_MAX_MB) was full and dropped the oldest; "
            f"fetch links soon after they are made, or {again.removeprefix('generate it again, or ')}"
        )

    def _drop_expired(self, now: float) -> None:
        """Drop expired images from the oldest on: the same lifetime for all, so they expire in order."""
        while self._files:
            file_id, oldest = next(iter(self._files.items()))
            if oldest.expires > now:
                return
            self._drop(file_id)

    def _drop_oldest(self) -> None:
        self._drop(next(iter(self._files)))

    def _drop(self, file_id: str) -> None:
        self._bytes -= len(self._files.pop(file_id).data)


def _expiry_of(file_id: str) -> int | None:
    """The expiry written into a file id ('<token>-<expiry>.<ext>'), or None if it is not one."""
    stem, _, _ = file_id.rpartition(".")
    _, _, expiry = stem.rpartition("-")
    return int(expiry) if expiry.isascii() and expiry.isdigit() and len(expiry) <= 12 else None


@dataclass(frozen=True)
class Delivery:
    """How a request's images reach its client: inline (base64), or as absolute links to this
    gateway's `ImageFiles` (`base_url`: the request's own, e.g. 'http://host:8000/')."""

    response_format: str = "b64_json"
    files: ImageFiles | None = None
    base_url: str = ""

    def data(self, encoded: list[bytes], fmt: OutputFormat) -> list[ImageData]:
        if self.response_format != "url":
            return [ImageData(b64_json=base64.b64encode(e).decode()) for e in encoded]
        if self.files is None:
            raise RuntimeError("response_format 'url' needs the gateway's image store")
        root = f"{self.base_url.rstrip('/')}{FILES_PATH}"
        return [ImageData(url=f"{root}/{self.files.put(e, fmt)}") for e in encoded]


INLINE = Delivery()
