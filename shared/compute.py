"""Model compute on the process's main thread, with the asyncio event loop on another.

Why not a plain worker thread: torch's OpenMP pool runs about 40% slower when driven from a
secondary thread on these CPUs (measured: 20 SD3 steps at 256 px took 0.18 s from a worker
thread, 0.12-0.13 s from the main thread, same process, same model). So a service's event loop
runs in a background thread and hands model calls to the main thread through this executor.
Compute stays off the event loop either way; only which thread holds it changes.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

_STOP = object()


class MainThreadExecutor(Executor):
    """An Executor whose calls run, one at a time, inside `run_until_shutdown()`."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._shut = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if self._shut:
            raise RuntimeError("executor is shut down")
        future: Future[Any] = Future()
        self._queue.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shut = True
        self._queue.put(_STOP)

    def run_until_shutdown(self, poll_s: float = 0.5) -> None:
        """Serve calls on the current thread until `shutdown()`; wakes regularly so signal
        handlers (which Python runs on the main thread) are never held up."""
        while True:
            try:
                item = self._queue.get(timeout=poll_s)
            except queue.Empty:
                continue
            if item is _STOP:
                break
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)
        while True:  # fail whatever was queued after shutdown instead of leaving it hanging
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                item[0].cancel()
