"""`lego up --gpus N`: each replica starts on the GPU the autoscaler's placement rule picks
(lego/devices.py), the least compute committed; the autoscaler tells the pool what a new
replica will keep busy (its unit's load over its replicas)."""

from __future__ import annotations

import shutil
from typing import Any

import pytest

from lego.cli import build_parser
from lego.devices import DevicePlan
from lego.launcher import Mesh, MeshConfig
from lego.processes import Child, free_port
from services.autoscaler.actuators.local import LocalActuator
from services.autoscaler.placement import MIN_SHARE


def test_replicas_spread_over_the_gpus_and_a_busy_one_goes_where_least_is_committed() -> None:
    plan = DevicePlan(2)
    assert [plan.place(f"r{i}") for i in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    plan.place("busy", share=0.7)  # both hold 0.1: the first
    assert plan.place("busy-2", share=0.7) == "cuda:1"  # 0.8 on cuda:0
    assert plan.place("light") == "cuda:0"  # 0.8 against 0.8: the first
    plan.release("busy")
    assert plan.place("busy-3", share=0.7) == "cuda:0"  # its share went with it
    assert plan.committed() == pytest.approx([0.85, 0.8])


def test_a_group_takes_the_least_loaded_run_of_consecutive_gpus() -> None:
    plan = DevicePlan(4)
    plan.place("den-a", share=0.9)  # cuda:0
    plan.place("den-b", share=0.9)  # cuda:1
    assert plan.place("group", share=0.5, size=2) == "cuda:2"  # cuda:2-3, nothing there
    assert plan.committed() == pytest.approx([0.9, 0.9, 0.5, 0.5])
    with pytest.raises(ValueError, match="a group of 8 GPUs does not fit on 4"):
        plan.place("too-big", size=8)


def test_each_replica_the_mesh_starts_gets_its_own_gpu_in_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[Child] = []
    monkeypatch.setattr(Child, "start", lambda self: started.append(self))
    mesh = Mesh(MeshConfig(workflows=["sd3"], gpus=2, env={"LEGO_DEVICE": "cuda"}))
    try:
        mesh.units = {u.name: u for u in mesh.plan()}
        for name in mesh.units:
            mesh.add_replica(name)
        busy = mesh.add_replica("sd3-transformer", share=0.8)
        devices = {c.name: c.env["LEGO_DEVICE"] for c in started}
        assert devices == {
            "encoder-0": "cuda:0",
            "sd3-transformer-0": "cuda:1",
            "vae-0": "cuda:0",
            "sd3-transformer-1": "cuda:1",
        }
        assert busy.env["LEGO_DEVICE"] == "cuda:1"  # the less committed (one light replica, not two)
        assert mesh.devices is not None
        assert mesh.devices.committed() == pytest.approx([2 * MIN_SHARE, MIN_SHARE + 0.8])
        mesh.remove_replica("sd3-transformer")  # the newest: its share is freed at once
        assert mesh.devices.committed() == pytest.approx([2 * MIN_SHARE, MIN_SHARE])
    finally:
        shutil.rmtree(mesh.workdir, ignore_errors=True)


def test_one_gpu_leaves_the_device_as_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[Child] = []
    monkeypatch.setattr(Child, "start", lambda self: started.append(self))
    mesh = Mesh(MeshConfig(workflows=["sd3"], env={"LEGO_DEVICE": "cuda:1"}))
    try:
        mesh.units = {u.name: u for u in mesh.plan()}
        mesh.add_replica("sd3-transformer")
        assert mesh.devices is None and started[0].env["LEGO_DEVICE"] == "cuda:1"
    finally:
        shutil.rmtree(mesh.workdir, ignore_errors=True)


@pytest.mark.parametrize("flags", [["--gpus", "2"], ["--gpus", "2", "--device", "cuda:0"], ["--gpus", "0"]])
def test_gpus_without_plain_cuda_is_refused_before_anything_starts(
    flags: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LEGO_DEVICE", raising=False)
    args = build_parser().parse_args(["up", "--port", str(free_port()), *flags])
    assert args.func(args) == 2
    assert "with --device cuda" in capsys.readouterr().err


def test_the_local_actuator_tells_the_pool_each_new_replicas_share() -> None:
    class Pool:
        def __init__(self) -> None:
            self.count, self.shares = 1, []

        def unit_models(self) -> dict[str, tuple[str, ...]]:
            return {"den": ("m",)}

        def replica_count(self, unit: str) -> int:
            return self.count

        def add_replica(self, unit: str, share: float = MIN_SHARE) -> Any:
            self.count += 1
            self.shares.append(share)

        def remove_replica(self, unit: str) -> Any:
            self.count -= 1

    pool = Pool()
    LocalActuator(pool).scale("den", 3, share=0.6)
    LocalActuator(pool).scale("den", 4)  # no share known: the floor
    assert pool.shares == [0.6, 0.6, MIN_SHARE]
