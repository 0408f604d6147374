"""Where the autoscaler puts a new replica (services/autoscaler/placement.py): the device with
the least compute committed that holds it, ties to the fullest; nowhere when none holds it."""

from __future__ import annotations

from services.autoscaler.placement import MIN_SHARE, DeviceLoad, choose_device, share_of

GIB = 2**30


def test_a_replica_goes_where_least_compute_is_committed_not_where_most_memory_is_free() -> None:
    devices = [
        DeviceLoad(memory_free=70 * GIB, committed=0.9),  # a busy denoiser, lots of memory left
        DeviceLoad(memory_free=30 * GIB, committed=0.1),  # a text encoder, little memory left
    ]
    assert choose_device(devices, 20 * GIB) == 1


def test_a_device_without_the_memory_is_never_chosen_however_idle() -> None:
    devices = [DeviceLoad(memory_free=10 * GIB), DeviceLoad(memory_free=60 * GIB, committed=1.5)]
    assert choose_device(devices, 20 * GIB) == 1
    assert choose_device(devices, 61 * GIB) is None


def test_among_equally_loaded_devices_the_fullest_that_holds_it_is_chosen() -> None:
    """Best fit on ties keeps the large holes for the large replicas (a Flux transformer)."""
    devices = [DeviceLoad(80 * GIB), DeviceLoad(25 * GIB), DeviceLoad(50 * GIB), DeviceLoad(25 * GIB, committed=0.004)]
    assert choose_device(devices, 20 * GIB) == 1  # 25 GiB free; the last is as idle (within 0.01) but later
    assert choose_device(devices, 30 * GIB) == 2


def test_a_replicas_share_is_its_units_load_over_its_replicas_between_a_floor_and_one_device() -> None:
    assert share_of(load=1.5, replicas=3) == 0.5
    assert share_of(load=8.0, replicas=2) == 1.0  # a replica never computes more than its device
    assert share_of(load=0.0, replicas=4) == MIN_SHARE  # an idle unit's replica still counts
    assert share_of(load=0.3, replicas=0) == 0.3
