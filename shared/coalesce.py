"""Coalescing one-shot model calls: steps queued for the same model run as one batched call.

Why: on a GPU a text encoder (or a VAE) costs about as much for eight inputs as for one, so
a replica under load should encode what has queued up in one call instead of one by one.
No waiting is added: while the engine computes a call, new steps queue; when it is free it
takes the oldest step and every queued step that can run with it (same `key`: the same
options, shapes that stack), up to `max_batch`, and runs `run_many` over them. Alone, a step
runs as `run_many([item])`, which services keep exact (e.g. the pipeline's own batch-1 calls).

If a batched call fails, each of its steps is run again alone, so one bad input fails only
its own step. (The denoiser's loop needs more than this: `services/denoiser/batching.py`.)
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)
class _Queued(Generic[T, R]):
    item: T
    key: Hashable
    future: Future[R] = field(default_factory=Future)


def max_batch(configured: int, device: str, gpu_default: int) -> int:
    """A service's max batch: `configured` when set (> 0), else `gpu_default` on a GPU and 1
    (no batching) on the CPU, where one input's matrix products already keep the cores busy."""
    if configured > 0:
        return configured
    return gpu_default if device.startswith("cuda") else 1


class Coalescer(Generic[T, R]):
    """`submit(item)` from any thread returns a Future of `run_many([... item ...])`'s result
    for it; all calls run on the coalescer's own thread, oldest first."""

    def __init__(
        self,
        run_many: Callable[[list[T]], list[R]],
        key: Callable[[T], Hashable],
        max_batch: int,
        name: str = "coalescer",
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self._run_many = run_many
        self._key = key
        self._on_batch = on_batch
        self._queue: list[_Queued[T, R]] = []
        self._cond = threading.Condition()
        self._closed = False
        self.batch_sizes: Counter[int] = Counter()  # items per call, over the coalescer's life
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T) -> Future[R]:
        queued: _Queued[T, R] = _Queued(item, self._key(item))
        with self._cond:
            if self._closed:
                raise RuntimeError(f"{self._thread.name} is closed")
            self._queue.append(queued)
            self._cond.notify()
        return queued.future

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=60)

    def _take(self) -> list[_Queued[T, R]] | None:
        """The oldest queued item and the next ones with its key (None once closed)."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                for queued in self._queue:
                    queued.future.set_exception(RuntimeError("shutting down"))
                self._queue.clear()
                return None
            lead = self._queue[0]
            batch = [q for q in self._queue if q.key == lead.key][: self.max_batch]
            self._queue = [q for q in self._queue if q not in batch]
            return batch

    def _serve(self) -> None:
        while (batch := self._take()) is not None:
            self._run(batch)

    def _run(self, batch: list[_Queued[T, R]]) -> None:
        try:
            results = self._run_many([q.item for q in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_many returned {len(results)} results for {len(batch)} items")
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            log.warning("a batched call of %d failed (%s); running each alone", len(batch), exc)
            for queued in batch:
                self._run([queued])
            return
        self.batch_sizes[len(batch)] += 1
        if self._on_batch is not None:
            self._on_batch(len(batch))
        for queued, result in zip(batch, results, strict=True):
            queued.future.set_result(result)
