"""The cluster simulator (services/autoscaler/simulator.py): queues, stages, cold starts, the
memory budget, all driven by the autoscaler's own policy."""

from __future__ import annotations

import pytest

from services.autoscaler.policy import Limits, PolicyConfig, Slo
from services.autoscaler.simulator import ModelProfile, Simulation, attainment

GIB = 2**30


def _fixed(units: list[str], n: int = 1) -> PolicyConfig:
    return PolicyConfig(limits={u: Limits(n, n) for u in units})


def test_one_replica_serves_first_come_first_served() -> None:
    sim = Simulation(
        workflows={"w": [["m"]]},
        models={"m": ModelProfile(step_s=1.0, memory_bytes=GIB, load_s=5.0)},
        units={"u": ["m"]},
        policy=_fixed(["u"]),
    )
    outcomes = sim.run([(0.0, "w"), (0.0, "w"), (0.5, "w")], until=100)
    assert [o.latency_s for o in outcomes] == [1.0, 2.0, 2.5]
    assert sim.starts == 0


def test_stages_run_in_order_and_their_models_in_parallel() -> None:
    models = {
        "a": ModelProfile(0.2, GIB, 1),
        "b": ModelProfile(0.5, GIB, 1),
        "c": ModelProfile(1.0, GIB, 1),
    }
    sim = Simulation(
        workflows={"w": [["a", "b"], ["c"]]},
        models=models,
        units={"ua": ["a"], "ub": ["b"], "uc": ["c"]},
        policy=_fixed(["ua", "ub", "uc"]),
        hop_s=0.01,
    )
    [outcome] = sim.run([(0.0, "w")], until=10)
    assert outcome.latency_s == pytest.approx(0.5 + 0.01 + 1.0 + 0.01)
    assert sim.solo_latency("w") == pytest.approx(outcome.latency_s)


def test_a_burst_makes_the_policy_start_replicas_that_serve_after_their_load_time() -> None:
    policy = PolicyConfig(slo=Slo(factor=5.0), cooldown_s=5.0, limits={"u": Limits(1, 6)})
    sim = Simulation(
        workflows={"w": [["m"]]},
        models={"m": ModelProfile(step_s=1.0, memory_bytes=GIB, load_s=3.0)},
        units={"u": ["m"]},
        policy=policy,
    )
    outcomes = sim.run([(0.0, "w")] * 24, until=200)
    assert all(o.latency_s is not None for o in outcomes)
    assert sim.starts >= 3
    # One replica alone would take 24 s; the extra ones (serving from t=3 s) cut that well down.
    assert max(o.latency_s for o in outcomes) < 12
    assert sim.replicas_now() == {"u": 1}  # and go away once the burst is served (after the cooldown)


def test_memory_budget_limits_what_can_be_resident() -> None:
    """Two 60 GiB pipelines, 100 GiB of memory: they take turns (a cold start each time)."""
    models = {"p1": ModelProfile(1.0, 60 * GIB, 10.0), "p2": ModelProfile(1.0, 60 * GIB, 10.0)}
    policy = PolicyConfig(
        memory_budget_bytes=100 * GIB, cooldown_s=2.0, limits={"u1": Limits(0, 2), "u2": Limits(0, 2)}
    )
    sim = Simulation(
        workflows={"w1": [["p1"]], "w2": [["p2"]]},
        models=models,
        units={"u1": ["p1"], "u2": ["p2"]},
        policy=policy,
        start_replicas={"u1": 1},
    )
    outcomes = sim.run([(0.0, "w1"), (1.0, "w2"), (30.0, "w1")], until=200)
    latencies = [o.latency_s for o in outcomes]
    assert latencies[0] == 1.0  # resident
    assert latencies[1] is not None and latencies[1] >= 10.0  # waited for p1 to go and p2 to load
    assert latencies[2] is not None and latencies[2] >= 10.0  # p1 was evicted for p2: loaded again
    assert sim.starts >= 2


def test_attainment_counts_unfinished_requests_as_missed() -> None:
    sim = Simulation(
        workflows={"w": [["m"]]},
        models={"m": ModelProfile(step_s=1.0, memory_bytes=GIB, load_s=1.0)},
        units={"u": ["m"]},
        policy=_fixed(["u"]),
    )
    outcomes = sim.run([(0.0, "w")] * 4, until=2.5)
    assert [o.latency_s for o in outcomes] == [1.0, 2.0, None, None]
    assert attainment(outcomes, {"w": 1.5}) == 0.25


def test_replicas_on_one_gpu_share_its_compute_and_need_its_memory() -> None:
    models = {"a": ModelProfile(4.0, 10 * GIB, 1.0), "b": ModelProfile(0.5, 10 * GIB, 1.0)}
    sim = Simulation(
        workflows={"wa": [["a"]], "wb": [["b"]]},
        models=models,
        units={"ua": ["a"], "ub": ["b"]},
        policy=_fixed(["ua", "ub"]),
        gpus=1,
    )
    outcomes = sim.run([(0.0, "wa"), (0.0, "wb")], until=10)
    # Time slicing: the short step runs at half speed beside the long one (1 s, not 0.5 s and not
    # 4.5 s behind it); the long one then has the GPU to itself again (4 + 0.5 s in all).
    assert [o.latency_s for o in outcomes] == pytest.approx([4.5, 1.0])

    big = Simulation(
        workflows={"w": [["m"]]},
        models={"m": ModelProfile(step_s=1.0, memory_bytes=50 * GIB, load_s=1.0)},
        units={"u": ["m"]},
        policy=PolicyConfig(limits={"u": Limits(1, 4)}),
        gpus=2,
    )
    big.run([(0.0, "w")] * 20, until=100)
    assert big.starts == 1 and big.unplaced >= 1  # a second GPU holds one more; a third copy fits nowhere


def test_the_cluster_benchmark_runs_both_systems_on_the_catalogue(tmp_path) -> None:
    """bench/simulate.py end to end on a short trace: both systems serve every request type."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "bench/simulate.py", "--rates", "0.3", "--bursts", "2", "--phase-s", "300", "--out", tmp_path],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "capacity ratio micro/monolithic" in out and "burst ratio micro/monolithic" in out
    assert (tmp_path / "simulate-rates.png").stat().st_size > 0 and (tmp_path / "simulate-bursts.png").is_file()
    rows = json.loads((tmp_path / "simulate.json").read_text())["rows"]
    assert [r["phase"] for r in rows] == ["0.3 req/s", "burst 2x"]
    for row in rows:
        for system in ("micro", "monolithic"):
            assert row[system]["requests"] > 0 and 0.9 <= row[system]["attainment"] <= 1.0  # light load: served
