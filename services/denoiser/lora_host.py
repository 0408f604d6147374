"""LoRA files read into host memory: a byte-bounded LRU cache that requests hold while they run.

Why a host cache beside the device one (`lora.py`): reading a file is the slow part of a
first use (disk or a network volume), loading tensors already in memory into the network is
fast. The gateway sends a prefetch hint when it plans a request (`prefetch`), so the read
overlaps the prompt's encoding; the request's step then finds its LoRAs here, or waits for
the read in flight (one read per file, however many ask). A request holds its LoRAs from
before its loop starts until it ends: a held entry is never evicted, so a LoRA deleted (or its
file removed) while requests use it stays for them. Unheld entries go least recently used
first once the cache is over `max_bytes`; held ones may keep it over budget until released.

Thread-safe: steps wait on threads of their own, prefetches read on the cache's reader threads.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.lora_files import read_header, weights_file

log = logging.getLogger("lego.denoiser.loras")


@dataclass(frozen=True)
class LoraTensors:
    """One LoRA file in memory: its tensors (CPU), diffusers' adapter metadata, their bytes."""

    state: dict[str, Any]
    metadata: dict[str, Any] | None
    nbytes: int


def read_lora(path: str | Path) -> LoraTensors:
    """Read a safetensors LoRA (never a pickle: the header is checked first) as diffusers'
    `lora_state_dict` reads it: the same tensors and the same adapter metadata."""
    import safetensors.torch
    from diffusers.utils.state_dict_utils import _load_sft_state_dict_metadata

    file = weights_file(path)
    read_header(file)  # LoraFileError (a ValueError) for anything but safetensors
    state = safetensors.torch.load_file(str(file), device="cpu")
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    return LoraTensors(state=state, metadata=_load_sft_state_dict_metadata(str(file)), nbytes=nbytes)


def _log_failed_read(done: Future[LoraTensors], path: str | Path) -> None:
    """A prefetch nobody waits on yet: its failure is logged here (the step that needs it retries the read)."""
    if done.exception() is not None:
        log.warning("prefetch of LoRA %s failed: %s", path, done.exception())


class HostLoraCache:
    """LoRA tensors by key (`shared.lora_registry.adapter_key`), least recently used first."""

    def __init__(self, max_bytes: int, read: Callable[[str | Path], LoraTensors] = read_lora, readers: int = 2) -> None:
        self.max_bytes = max_bytes
        self._read = read
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, LoraTensors] = OrderedDict()
        self._reading: dict[str, Future[LoraTensors]] = {}
        self._holds: Counter[str] = Counter()
        self._doomed: set[str] = set()  # deleted while held: dropped at their last release
        self._pool = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="lora-read")
        self.hits = 0
        self.misses = 0  # a step found its LoRA not read yet (read now, or still being read)

    def total_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def keys(self) -> list[str]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def held(self, key: str) -> bool:
        with self._lock:
            return self._holds[key] > 0

    def get(self, key: str, path: str | Path) -> LoraTensors:
        """The LoRA's tensors, read from `path` unless cached or being read; raises what the read raised."""
        future, reader = self._claim(key, path, count=True)
        if reader:
            self._fill(key, path, future)
        return future.result()

    def prefetch(self, key: str, path: str | Path) -> Future[LoraTensors]:
        """Start reading on a reader thread (nothing when cached or in flight); the read's future."""
        future, reader = self._claim(key, path, count=False)
        if reader:
            future.add_done_callback(lambda done: _log_failed_read(done, path))
            self._pool.submit(self._fill, key, path, future)
        return future

    def _claim(self, key: str, path: str | Path, count: bool) -> tuple[Future[LoraTensors], bool]:
        """(the future holding `key`, whether this caller must read it)."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += count
                done: Future[LoraTensors] = Future()
                done.set_result(self._entries[key])
                return done, False
            self.misses += count
            if key in self._reading:
                return self._reading[key], False
            future: Future[LoraTensors] = Future()
            self._reading[key] = future
            return future, True

    def _fill(self, key: str, path: str | Path, future: Future[LoraTensors]) -> None:
        try:
            tensors = self._read(path)
        except BaseException as exc:
            with self._lock:
                self._reading.pop(key, None)
            future.set_exception(exc)
            return
        with self._lock:
            self._reading.pop(key, None)
            self._entries[key] = tensors
            self._evict()
        future.set_result(tensors)

    def _evict(self) -> None:
        """Drop least recently used unheld entries while over budget (called with the lock)."""
        total = sum(e.nbytes for e in self._entries.values())
        for key in list(self._entries):
            if total <= self.max_bytes:
                return
            if self._holds[key] == 0:
                total -= self._entries.pop(key).nbytes

    def hold(self, keys: Iterable[str]) -> None:
        with self._lock:
            self._holds.update(keys)

    def release(self, keys: Iterable[str]) -> None:
        with self._lock:
            self._holds.subtract(keys)
            self._holds += Counter()  # drop zero counts
            for key in [k for k in self._doomed if self._holds[k] == 0]:
                self._doomed.discard(key)
                self._entries.pop(key, None)
            self._evict()

    def forget(self, key: str) -> None:
        """A deleted LoRA: drop it now, or, while requests hold it, when the last one lets go."""
        with self._lock:
            if self._holds[key] > 0:
                self._doomed.add(key)
            else:
                self._entries.pop(key, None)

    @contextmanager
    def holding(self, keys: list[str]) -> Iterator[None]:
        """Hold `keys` for a request's life: not evicted while it runs, whatever else is read."""
        self.hold(keys)
        try:
            yield
        finally:
            self.release(keys)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
