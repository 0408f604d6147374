"""`lego up --group UNIT=K` and `--parallel-mode`: parallel denoiser groups under the launcher.

No process starts here: the flags are parsed and refused before the mesh starts, a replica's
environment is what `Mesh.replica_env` builds, and the autoscaler's memory of a group replica
is checked through its observer with a stand-in bus.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from lego import up
from lego.cli import build_parser
from lego.launcher import Mesh, MeshConfig
from lego.processes import free_port
from services.autoscaler import signals
from services.autoscaler.policy import Limits, PolicyConfig, ScalePolicy, Slo
from services.autoscaler.signals import Observer, replica_memory
from shared.bus import ConsumerCounters
from shared.messages import ReplicaInfo, StepKind

GIB = 2**30


@pytest.fixture(autouse=True)
def _no_group_settings_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LEGO_DENOISE_GROUP_SIZE", raising=False)
    monkeypatch.delenv("LEGO_PARALLEL_MODE", raising=False)


@pytest.fixture
def mesh_of() -> Iterator[Any]:
    made: list[Mesh] = []

    def make(**config: Any) -> Mesh:
        made.append(Mesh(MeshConfig(**config)))
        return made[-1]

    yield make
    for mesh in made:
        shutil.rmtree(mesh.workdir, ignore_errors=True)


def _lego_up(*flags: str) -> int:
    args = build_parser().parse_args(["up", "--port", str(free_port()), *flags])
    return args.func(args)


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--group", "sd3-transformer=3"], "a group is 1, 2, 4 devices"),
        (["--group", "sd3-transformer=0"], "a group is 1, 2, 4 devices"),
        (["--group", "sd3-transformer"], "use UNIT=K"),
        (["--group", "sd3-transformer=two"], "use UNIT=K"),
        (["--group", "encoder=2"], "encoder is not a denoiser unit here"),
        (["--group", "sd3-unet=2"], "sd3-unet is not a denoiser unit here"),
        (["--workflows", "sd3", "--group", "flux-transformer=2"], "denoiser units: ['sd3-transformer']"),
    ],
)
def test_a_bad_group_is_refused_before_anything_starts(
    flags: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _lego_up(*flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("lego up: --group") and says in err, err


def test_a_bad_parallel_mode_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["up", "--parallel-mode", "sometimes"])
    assert exit_.value.code == 2
    assert "adaptive" in capsys.readouterr().err


def test_group_flags_are_repeatable_and_reach_the_mesh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both spellings of a repeated flag; the mesh is stopped at its start to see its config."""
    seen: list[MeshConfig] = []

    class Stopped(Mesh):
        def start(self, ready_timeout_s: float = 300.0) -> None:
            seen.append(self.config)
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise RuntimeError("stopped by the test")

    monkeypatch.setattr(up, "Mesh", Stopped)
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # `lego up`'s Ctrl-C handler stays out of pytest
    flags = ["--no-autoscale", "--group", "sd3-transformer=2", "flux-transformer=4", "--group", "sd15-unet=1"]
    assert _lego_up(*flags, "--parallel-mode", "never") == 1
    assert seen[0].groups == {"sd3-transformer": 2, "flux-transformer": 4, "sd15-unet": 1}
    assert seen[0].parallel_mode == "never"
    assert _lego_up("--no-autoscale") == 1
    assert seen[1].groups == {} and seen[1].parallel_mode is None


def test_only_the_grouped_unit_gets_its_group_size_and_the_denoisers_the_mode(mesh_of: Any) -> None:
    mesh = mesh_of(groups={"sd3-transformer": 2}, parallel_mode="always")
    units = {u.name: u for u in mesh.plan()}
    env = {name: mesh.replica_env(unit) for name, unit in units.items()}
    assert env["sd3-transformer"]["LEGO_DENOISE_GROUP_SIZE"] == "2"
    for name, unit in units.items():
        if name != "sd3-transformer":
            assert "LEGO_DENOISE_GROUP_SIZE" not in env[name], name
        assert ("LEGO_PARALLEL_MODE" in env[name]) == (unit.service == "denoiser"), name
        if unit.service == "denoiser":
            assert env[name]["LEGO_PARALLEL_MODE"] == "always"
    assert mesh.group_sizes() == {"sd3-transformer": 2}
    assert env["encoder"]["LEGO_NATS_URL"] == env["sd3-transformer"]["LEGO_NATS_URL"]  # the rest as before


def test_the_environment_s_group_size_is_the_default_and_the_flag_wins(
    mesh_of: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LEGO_DENOISE_GROUP_SIZE", "2")
    mesh = mesh_of(workflows=["sd3", "flux"], groups={"flux-transformer": 4})
    assert mesh.group_sizes() == {"sd3-transformer": 2, "flux-transformer": 4}
    assert mesh_of(workflows=["sd3"], groups={"sd3-transformer": 1}).group_sizes() == {}


def test_a_mesh_refuses_groups_it_cannot_form(mesh_of: Any) -> None:
    with pytest.raises(ValueError, match="vae is not a denoiser unit"):
        mesh_of(workflows=["sd3"], groups={"vae": 2}).start()
    with pytest.raises(ValueError, match="a group is 1, 2, 4 devices"):
        mesh_of(workflows=["sd3"], groups={"sd3-transformer": 8}).start()


def test_the_banner_names_the_groups(mesh_of: Any) -> None:
    mesh = mesh_of(workflows=["sd3", "flux"], groups={"sd3-transformer": 2, "flux-transformer": 4})
    assert "Parallel groups (devices a replica): flux-transformer x4, sd3-transformer x2; requests split: adaptive" in (
        up._groups_banner(mesh)
    )
    assert up._groups_banner(mesh_of(workflows=["sd3"])) == ""


# ---------------------------------------------------------------------------------------------
# The autoscaler's memory budget: a group replica holds k model copies


def _announced(device: str, rss: int, params: int, group_devices: int = 1) -> list[ReplicaInfo]:
    info = ReplicaInfo(
        group_devices=group_devices,
        replica_id="r1",
        kind=StepKind.DENOISE,
        model_id="sd3-transformer",
        host="h",
        pid=1,
        device=device,
        rss_bytes=rss,
        param_bytes=params,
    )
    return [info]


def test_a_group_replica_counts_one_model_copy_per_device() -> None:
    assert replica_memory(_announced("cpu", 3 * GIB, GIB)) == 3 * GIB  # the process's resident set
    # a group of 2 on a CPU: the leader and its 2 followers, each holding a copy
    assert replica_memory(_announced("cpu", 3 * GIB, GIB), 2) == 9 * GIB
    assert replica_memory(_announced("cpu", 3 * GIB, GIB, group_devices=2)) == 9 * GIB  # as its leader announces
    # On GPUs the leader announces the parameters of all its copies (4 GPUs, 1 GiB each): not counted twice.
    assert replica_memory(_announced("cuda:0", 3 * GIB, 4 * GIB, group_devices=4), 4) == 4 * GIB


class _Bus:
    """What the observer asks the bus: the step consumers' counters (12 denoising steps queued)."""

    async def step_consumers(self) -> list[ConsumerCounters]:
        return [ConsumerCounters("denoise", "sd3-transformer", pending=12, ack_pending=0, delivered=0)]


def test_the_autoscaler_budgets_a_cpu_group_of_two_as_its_three_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """12 steps of 1 s, an SLO of 5x: 3 replicas wanted; 10 GiB of RAM fit three 3 GiB replicas,
    but one group of two (on a CPU: its leader and 2 followers, 9 GiB)."""
    replicas = _announced("cpu", 3 * GIB, GIB)
    replicas[0].seconds_per_item = 1.0

    async def live(_bus: object) -> list[ReplicaInfo]:
        return replicas

    monkeypatch.setattr(signals, "live_replicas", live)
    config = PolicyConfig(slo=Slo(factor=5.0), default_limits=Limits(1, 4), memory_budget_bytes=10 * GIB)
    targets = {}
    for groups in ({}, {"sd3-transformer": 2}):
        observer = Observer.for_policy(_Bus(), config, 10.0, group_sizes=groups)  # type: ignore[arg-type]
        [seen] = asyncio.run(observer.observe({"sd3-transformer": ("sd3-transformer",)}, {"sd3-transformer": 1}, 0.0))
        [decision] = ScalePolicy(config).decide([seen.signal], 0.0)
        targets[len(groups)] = (seen.signal.memory_bytes, decision.desired, decision.target)
    assert targets == {0: (3 * GIB, 3, 3), 1: (9 * GIB, 3, 1)}
