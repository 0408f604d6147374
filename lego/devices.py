"""Which GPU of this machine each replica `lego up` starts runs on (`lego up --gpus N`).

Why: on a machine of several GPUs every replica used to run on the one `--device` names, so N
GPUs served like one. The autoscaler's placement rule (`services/autoscaler/placement.py`,
the one the cluster simulation measures) now picks the device: the least compute committed,
ties to the lowest index. A replica commits the share of a device the autoscaler expects it to
keep busy (its unit's load over its replicas; a replica started before any load, `MIN_SHARE`).
A parallel group of k devices (`lego up --group`) takes k consecutive GPUs, the k whose
commitments add up least; it runs on cuda:<first>..<first + k - 1>.

Memory is not weighed here: what a replica will hold is known only once it announces itself,
and the autoscaler's memory budget already bounds what runs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from services.autoscaler.placement import MIN_SHARE, DeviceLoad, choose_device


@dataclass(frozen=True)
class Placed:
    first: int  # its first GPU
    size: int  # GPUs it holds from there
    share: float  # compute it commits on each


class DevicePlan:
    """The GPUs cuda:0..n-1 and the replicas placed on them, by replica name. Thread-safe: the
    autoscaler's thread and the restart loop both start replicas."""

    def __init__(self, gpus: int) -> None:
        if gpus < 1:
            raise ValueError(f"{gpus} GPUs: need at least 1")
        self.gpus = gpus
        self._lock = threading.Lock()
        self._placed: dict[str, Placed] = {}

    def committed(self) -> list[float]:
        """Each GPU's committed compute."""
        with self._lock:
            return self._committed()

    def _committed(self) -> list[float]:
        load = [0.0] * self.gpus
        for p in self._placed.values():
            for i in range(p.first, p.first + p.size):
                load[i] += p.share
        return load

    def place(self, replica: str, share: float = MIN_SHARE, size: int = 1) -> str:
        """The device string (`cuda:i`) replica `replica` starts on, and its share recorded;
        ValueError when a group is larger than the machine."""
        if not 1 <= size <= self.gpus:
            raise ValueError(f"a group of {size} GPUs does not fit on {self.gpus}: raise --gpus or lower --group")
        with self._lock:
            load = self._committed()
            windows = [DeviceLoad(0, sum(load[i : i + size])) for i in range(self.gpus - size + 1)]
            first = choose_device(windows, 0)
            assert first is not None  # every window holds a replica of unknown memory
            self._placed[replica] = Placed(first, size, share)
        return f"cuda:{first}"

    def release(self, replica: str) -> None:
        """The replica stopped for good: its GPUs' share is free."""
        with self._lock:
            self._placed.pop(replica, None)
