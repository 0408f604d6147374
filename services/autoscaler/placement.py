"""Which device a new replica goes on: the one with the least compute already committed, among
those with the memory for it; ties to the one it fills best. No I/O here; `tests/unit` drives it.

Why compute first: a device runs the steps of all its replicas in time slices, so two busy
replicas on one device each run at half speed, and a request in a loop of steps finishes late
however many replicas serve it. Placing on the device with the most free memory (the rule before
this one, issue 15) spread small replicas over every device and stacked busy ones together.
In the 64-GPU simulation at 90% of the compute bound (`bench/cluster.py`, SLO 5x), attainment
went from 42% to 63% with this rule, and at SLO 10x from 93.5% to 100%; the tight fill rule
alone (best fit by memory) fell to 38%: it stacks compute on the fullest devices.

A replica's compute share is what its unit's replicas are busy on average, as the policy sees it
(`share_of`): its load (busy replica-seconds a second) over its replicas, at most a device. So a
lightly used text encoder lands beside a busy denoiser, not on an idle device of its own, and
a denoiser goes where nothing computes.

Why ties go to the fullest device that holds it (best fit): the free memory left in large holes
keeps room for the large replicas (a Flux or SD3.5-Large transformer takes most of a device).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["MIN_SHARE", "Device", "DeviceLoad", "choose_device", "share_of"]

MIN_SHARE = 0.05  # a replica about to serve is counted as some compute, however idle its unit
COMPUTE_TIE = 0.01  # compute commitments closer than this count as equal (then: best fit)


class Device(Protocol):
    """What placement reads of a device (the simulator's GPUs, an actuator's devices)."""

    @property
    def memory_free(self) -> int: ...

    @property
    def committed(self) -> float: ...


@dataclass(frozen=True)
class DeviceLoad:
    """One device as placement sees it: bytes free, and the compute share its replicas commit."""

    memory_free: int
    committed: float = 0.0


def share_of(load: float, replicas: int) -> float:
    """A replica's expected compute: its unit's load spread over its replicas (the new one
    included), between `MIN_SHARE` and one device."""
    return min(1.0, max(MIN_SHARE, load / max(replicas, 1)))


def choose_device(devices: Sequence[Device], memory: int) -> int | None:
    """The index of the device for a replica of `memory` bytes, or None when none holds it."""
    best: tuple[int, int, int] | None = None
    for i, device in enumerate(devices):
        if device.memory_free < memory:
            continue
        key = (round(device.committed / COMPUTE_TIE), device.memory_free, i)
        if best is None or key < best:
            best = key
    return None if best is None else best[2]
