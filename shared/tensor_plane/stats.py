"""Thread-safe byte/count counters per direction and transport, for metrics later."""

from __future__ import annotations

import threading
from collections import defaultdict


class TransferStats:
    """Counts and bytes per (section, transport), e.g. ("served", "tcp") or ("fetched", "shm")."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])

    def add(self, section: str, transport: str, nbytes: int = 0) -> None:
        """Record one event of `nbytes` bytes."""
        with self._lock:
            slot = self._counts[(section, transport)]
            slot[0] += 1
            slot[1] += nbytes

    def snapshot(self) -> dict[str, dict[str, dict[str, int]]]:
        """A plain nested dict copy: {section: {transport: {"count": n, "bytes": b}}}."""
        with self._lock:
            out: dict[str, dict[str, dict[str, int]]] = {}
            for (section, transport), (count, nbytes) in self._counts.items():
                out.setdefault(section, {})[transport] = {"count": count, "bytes": nbytes}
            return out
