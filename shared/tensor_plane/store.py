"""The producer's tensor store: what was put, for whom, until released or expired.

Tensors are kept until `release(owner)` or their TTL, never freed on first read: a step retried
after a crash must be able to read its inputs again. Every method is thread-safe (model code
puts from worker threads while the event loop serves reads).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shared.tensor_plane.errors import TensorUnavailable
from shared.tensor_plane.raw import RawTensor, byte_view
from shared.tensor_plane.shm import Segment, create_segment


@dataclass
class StoredTensor:
    """One stored tensor. `data` is a flat byte view over the segment or a private bytearray.

    A tensor kept in GPU memory has `device` "cuda:N" and `device_data` (a flat uint8 device
    buffer exposing `__cuda_array_interface__`, e.g. a torch tensor); `data` is then empty until a
    host reader asks for it (`host_view`, one device-to-host copy, kept for further host reads).
    """

    key: str
    owner: str
    token: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    data: memoryview
    segment: Segment | None
    expires_at: float
    device: str = "cpu"
    device_data: Any = None
    to_host: Callable[[], Any] | None = None

    @property
    def shm_name(self) -> str | None:
        return self.segment.name if self.segment is not None else None

    def host_view(self) -> memoryview:
        """The bytes in host memory (copied from the device on first use)."""
        if self.device_data is not None and len(self.data) != self.nbytes and self.to_host is not None:
            self.data = byte_view(self.to_host())
        return self.data


class TensorStore:
    """Keyed, token-protected storage. With `use_shm`, bytes live in a shared-memory segment
    (which also serves TCP reads, so a tensor is held once); otherwise in a private bytearray.
    """

    def __init__(self, ttl_s: float, use_shm: bool) -> None:
        self.ttl_s = float(ttl_s)
        self.use_shm = use_shm
        self._lock = threading.Lock()
        self._entries: dict[str, StoredTensor] = {}  # insertion order == expiry order (one TTL)
        self._by_owner: dict[str, set[str]] = defaultdict(set)
        self._nbytes = 0

    def put(self, raw: RawTensor, owner: str) -> StoredTensor:
        """Copy `raw` into the store (a snapshot: the caller may reuse its tensor afterwards)."""
        src = raw.buffer()
        segment = create_segment(raw.nbytes) if self.use_shm else None
        if segment is not None:
            assert segment.buf is not None  # a freshly created segment is always mapped
            data = segment.buf[: raw.nbytes]
            data[:] = src
        else:
            data = memoryview(bytearray(src))
        entry = StoredTensor(
            key=secrets.token_hex(12),
            owner=owner,
            token=secrets.token_urlsafe(24),
            dtype=raw.dtype,
            shape=raw.shape,
            nbytes=raw.nbytes,
            data=data,
            segment=segment,
            expires_at=time.monotonic() + self.ttl_s,
        )
        self._add(entry)
        return entry

    def _add(self, entry: StoredTensor) -> None:
        with self._lock:
            self._entries[entry.key] = entry
            self._by_owner[entry.owner].add(entry.key)
            self._nbytes += entry.nbytes
        self.sweep()

    def put_device(
        self,
        device_data: Any,
        dtype: str,
        shape: tuple[int, ...],
        nbytes: int,
        device: str,
        to_host: Callable[[], Any],
        owner: str,
    ) -> StoredTensor:
        """Keep a device buffer (already a private copy, see `put_tensor`) without touching the host."""
        entry = StoredTensor(
            key=secrets.token_hex(12),
            owner=owner,
            token=secrets.token_urlsafe(24),
            dtype=dtype,
            shape=tuple(shape),
            nbytes=nbytes,
            data=memoryview(b""),
            segment=None,
            expires_at=time.monotonic() + self.ttl_s,
            device=device,
            device_data=device_data,
            to_host=to_host,
        )
        self._add(entry)
        return entry

    def lookup(self, key: str, token: str) -> StoredTensor:
        """The entry for `key` if `token` matches and it has not expired; else TensorUnavailable."""
        with self._lock:
            entry = self._entries.get(key)
        if entry is None:
            raise TensorUnavailable(key, "unknown key here (released, expired, or never stored)")
        if not hmac.compare_digest(entry.token.encode(), str(token).encode()):
            raise TensorUnavailable(key, "wrong token")
        if entry.expires_at <= time.monotonic():
            self.sweep()
            raise TensorUnavailable(key, f"expired (tensor_ttl_s={self.ttl_s:g})")
        return entry

    def release(self, owner: str) -> int:
        """Free every tensor put for `owner`; returns how many were freed."""
        with self._lock:
            keys = self._by_owner.pop(owner, set())
            gone = [self._pop(k) for k in keys]
        return self._free([e for e in gone if e is not None])

    def sweep(self, now: float | None = None) -> int:
        """Free tensors whose TTL has passed; returns how many. Cheap when nothing expired."""
        now = time.monotonic() if now is None else now
        with self._lock:
            expired = []
            for key, entry in self._entries.items():
                if entry.expires_at > now:
                    break
                expired.append(key)
            gone = [self._pop(k, unlink_owner=True) for k in expired]
        return self._free([e for e in gone if e is not None])

    def clear(self) -> int:
        """Free everything (shutdown)."""
        with self._lock:
            gone = list(self._entries.values())
            self._entries.clear()
            self._by_owner.clear()
            self._nbytes = 0
        return self._free(gone)

    def segment_name(self, key: str) -> str | None:
        """The shared-memory segment name of a stored tensor, if any (diagnostics and tests)."""
        with self._lock:
            entry = self._entries.get(key)
        return entry.shm_name if entry is not None else None

    @property
    def count(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def _pop(self, key: str, unlink_owner: bool = False) -> StoredTensor | None:
        """Remove one entry; caller holds the lock."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self._nbytes -= entry.nbytes
        if unlink_owner:
            keys = self._by_owner.get(entry.owner)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_owner[entry.owner]
        return entry

    @staticmethod
    def _free(entries: list[StoredTensor]) -> int:
        """Unlink segments outside the lock. Views already handed out stay valid.

        A device entry's memory goes back to its allocator when the last reference to the entry
        (a send in flight) is gone.
        """
        for entry in entries:
            if entry.segment is not None:
                entry.data = memoryview(b"")  # drop our view so the mapping can go now
                entry.segment.destroy()
        return len(entries)
