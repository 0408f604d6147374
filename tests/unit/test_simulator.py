"""The cluster simulator (services/autoscaler/simulator.py): queues, stages, cold starts, the
memory budget, all driven by the autoscaler's own policy."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from services.autoscaler.policy import Limits, PolicyConfig, Slo
from services.autoscaler.simulator import Adapters, Link, ModelProfile, Simulation, attainment

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


# -- parallel groups (issue 14): a replica owning k devices splits requests as the denoiser's rule says


def _group(mode: str = "adaptive", size: int = 2, **kw) -> Simulation:
    """One replica of a group of `size` devices; a step takes 1 s on one device, 0.55 s split over
    two, 0.35 s over four ("m"); "n" cannot be split."""
    return Simulation(
        workflows={"w": [["m"]], "plain": [["n"]]},
        models={
            "m": ModelProfile(step_s=1.0, memory_bytes=GIB, load_s=1.0, degree_s={2: 0.55, 4: 0.35}),
            "n": ModelProfile(step_s=1.0, memory_bytes=GIB, load_s=1.0),
        },
        units={"u": ["m", "n"]},
        policy=_fixed(["u"]),
        group_size={"u": size},
        parallel_mode=mode,
        **kw,
    )


def _poisson(rate: float, seconds: float, seed: int) -> list[tuple[float, str]]:
    import random

    rng, t, out = random.Random(seed), 0.0, []
    while (t := t + rng.expovariate(rate)) < seconds:
        out.append((t, "w"))
    return out


def test_a_group_splits_a_lone_request_and_finishes_it_sooner() -> None:
    one_at_a_time = [(0.0, "w"), (10.0, "w"), (20.0, "w")]
    adaptive, never = _group("adaptive"), _group("never")
    split = adaptive.run(one_at_a_time, until=100)
    whole = never.run(one_at_a_time, until=100)
    assert [o.latency_s for o in split] == pytest.approx([0.55] * 3)  # both devices on each request
    assert [o.latency_s for o in whole] == pytest.approx([1.0] * 3)
    assert [o.degree for o in split] == [2, 2, 2] and [o.degree for o in whole] == [1, 1, 1]
    assert adaptive.degrees == {2: 3} and adaptive.degree_reasons == {"fair share": 3}
    assert never.degrees == {1: 3}


def test_a_busy_group_runs_requests_side_by_side_and_keeps_never_splits_throughput() -> None:
    """Twice the group's capacity for a minute: adaptive falls back to one device a request and
    serves as many as never splitting (give or take the request split while the group was still
    idle at the start: one split costs 2 x 0.55 device-seconds for 1); always splitting (the
    exchange's cost on every request) serves 10% fewer."""
    arrivals = _poisson(rate=4.0, seconds=60, seed=3)
    done = {}
    for mode in ("adaptive", "never", "always"):
        sim = _group(mode)
        outcomes = sim.run(arrivals, until=60)
        done[mode] = sum(1 for o in outcomes if o.latency_s is not None)
        if mode == "adaptive":
            assert sim.degrees[1] > 0.9 * sum(sim.degrees.values())
    assert done["never"] == pytest.approx(2 * 60, abs=3)  # two devices, a request a second each
    assert done["adaptive"] >= done["never"] - 1
    assert done["always"] < 0.95 * done["never"]

    # a backlog at once: the first arrival finds the group idle and is split, the second shrinks
    # it before it has done any work; then two at a time, one device each, as never splitting
    burst = [(0.0, "w")] * 21
    adaptive, never = _group("adaptive"), _group("never")
    split, whole = adaptive.run(burst, until=100), never.run(burst, until=100)
    assert max(o.latency_s for o in split) == pytest.approx(11.0)
    assert max(o.latency_s for o in whole) == pytest.approx(11.0)
    assert adaptive.degrees == {1: 20, 2: 1}


def test_a_split_step_shrinks_for_a_newcomer_and_grows_back_when_it_leaves() -> None:
    """As the denoiser's groups do: "w" alone is split (0.55 s over 2 devices); "n" (0.2 s, not
    splittable) arrives when a fifth of it is done and gets a device at once; "w" goes on alone
    on the other (0.8 of its 1 s left), and when "n" is done, with 0.6 of it left, takes both
    devices again (0.6 x 0.55 s). Never shrinking, "n" would wait for the whole split step."""
    models = {
        "m": ModelProfile(step_s=1.0, memory_bytes=GIB, load_s=1.0, degree_s={2: 0.55}),
        "n": ModelProfile(step_s=0.2, memory_bytes=GIB, load_s=1.0),
    }
    sim = Simulation(
        workflows={"w": [["m"]], "plain": [["n"]]},
        models=models,
        units={"u": ["m", "n"]},
        policy=_fixed(["u"]),
        group_size={"u": 2},
    )
    w, n = sim.run([(0.0, "w"), (0.11, "plain")], until=10)
    assert n.latency_s == pytest.approx(0.2)
    assert w.latency_s == pytest.approx(0.11 + 0.2 + 0.6 * 0.55)
    assert w.degree == 2


def test_the_deadline_rescue_borrows_a_groups_free_devices() -> None:
    # Two requests that cannot be split hold 2 of a group's 4 devices; a third, due in 0.8 s,
    # would take 1 s on its fair share of one device: it takes the two free ones (0.55 s).
    arrivals = [(0.0, "plain"), (0.0, "plain"), (0.1, "w")]
    rescued = _group(size=4, slo_s={"w": 0.8})
    outcomes = rescued.run(arrivals, until=10)
    assert [o.latency_s for o in outcomes] == pytest.approx([1.0, 1.0, 0.55])
    assert outcomes[2].degree == 2 and rescued.degree_reasons["deadline rescue"] == 1
    no_deadline = _group(size=4)
    assert no_deadline.run(arrivals, until=10)[2].latency_s == pytest.approx(1.0)


def test_a_group_needs_its_memory_on_k_gpus_and_a_split_step_waits_for_its_slowest_device() -> None:
    models = {
        "m": ModelProfile(step_s=1.0, memory_bytes=10 * GIB, load_s=1.0, degree_s={2: 0.5}),
        "e": ModelProfile(step_s=0.25, memory_bytes=10 * GIB, load_s=1.0),
    }
    sim = Simulation(
        workflows={"w": [["m"]], "we": [["e"]]},
        models=models,
        units={"u": ["m"], "ue": ["e"]},
        policy=_fixed(["u", "ue"]),
        group_size={"u": 2},
        gpus=2,
    )
    outcomes = sim.run([(0.0, "w"), (0.0, "we")], until=10)
    # The split step's half on the GPU it shares with "e" runs at half speed until "e" is done
    # (0.5 s), then alone: 0.75 s in all, though its other half was done at 0.5 s.
    assert [o.latency_s for o in outcomes] == pytest.approx([0.75, 0.5])
    assert [o.degree for o in outcomes] == [2, 1]

    one_gpu = Simulation(
        workflows={"w": [["m"]]},
        models={"m": models["m"]},
        units={"u": ["m"]},
        policy=_fixed(["u"]),
        group_size={"u": 2},
        gpus=1,
    )
    [outcome] = one_gpu.run([(0.0, "w")], until=10)
    assert outcome.latency_s is None and one_gpu.unplaced >= 1  # a group of 2 does not fit on 1 GPU


def test_groups_are_deterministic_for_a_seed() -> None:
    def run(seed: int) -> tuple[list, dict]:
        sim = _group(size=4, slo_s={"w": 1.5}, gpus=4)
        return sim.run(_poisson(rate=3.0, seconds=60, seed=seed), until=80), dict(sim.degrees)

    first, again, other = run(11), run(11), run(12)
    assert first == again
    assert first != other
    assert set(first[1]) > {1}  # it did split some


def test_a_group_refuses_an_unknown_mode_or_a_size_below_one() -> None:
    with pytest.raises(ValueError, match="adaptive, never, always"):
        _group("sometimes")
    with pytest.raises(ValueError, match="group sizes"):
        _group(size=0)


def test_the_cluster_benchmark_runs_the_mesh_with_denoiser_groups(tmp_path) -> None:
    """bench/simulate.py --group-size 2 on a short trace: every request served at light load, its
    denoiser steps counted by degree (a light load: mostly split), the profile's ratios recorded."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    args = ["--rates", "0.3", "--bursts", "2", "--phase-s", "300", "--group-size", "2", "--out", tmp_path]
    out = subprocess.run(
        [sys.executable, "bench/simulate.py", *args], cwd=root, capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert "groups of 2 GPUs, parallel mode adaptive" in out and "micro steps at degree 1/2" in out
    assert out.rstrip().splitlines()[-1].startswith("burst ratio micro/monolithic: ")
    summary = json.loads((tmp_path / "simulate.json").read_text())
    assert summary["groups"]["size"] == 2 and summary["groups"]["ratios"]["flux-transformer"]["2"] == 0.653
    for row in summary["rows"]:
        assert row["micro"]["requests"] > 0 and 0.9 <= row["micro"]["attainment"] <= 1.0
        degrees = row["micro"]["degrees"]
        assert degrees.get("2", 0) > degrees.get("1", 0)  # one request at a time, mostly: split


# -- issue 15: trace requests, ControlNets, LoRAs, step-level batching


@dataclass(frozen=True)
class _Traced:
    """A trace request as bench/traces/record.py's TraceRequest has it (its fields only)."""

    timestamp: float
    base_model: str
    controlnets: tuple[str, ...] = ()
    loras: tuple[str, ...] = ()
    workflow: str | None = None


def _denoiser(link: Link | None = None, **adapters: float) -> Simulation:
    """One replica of a 2 s denoiser, on GPU 0 of a node of 8: ControlNets add 1 s each on its
    device (cached 2 at a time, 0.5 s to load from host), or cross `link` 10 times (10 steps,
    1 GB of residuals a step); LoRAs cached 2 at a time, 0.3 s to load, 1 s more from disk,
    the node's host memory holding 4."""
    spec = {
        "steps": 10,
        "controlnet_s": 1.0,
        "controlnet_load_s": 0.5,
        "residual_bytes": 10**9,
        "controlnet_slots": 2,
        "lora_load_s": 0.3,
        "lora_disk_s": 1.0,
        "lora_slots": 2,
        "host_lora_slots": 4,
        **adapters,
    }
    return Simulation(
        workflows={"sdxl": [["unet"]]},
        models={"unet": ModelProfile(2.0, 10 * GIB, 1.0, adapters=Adapters(**spec))},  # type: ignore[arg-type]
        units={"u": ["unet"]},
        policy=_fixed(["u"]),
        gpus=8,
        controlnet_link=link,
    )


def test_trace_requests_are_replayed_with_their_workflow_from_the_base_model() -> None:
    sim = _denoiser()
    outcomes = sim.run([_Traced(0.0, "sdxl"), _Traced(5.0, "sdxl", workflow="sdxl")], until=20)
    assert [(o.workflow, o.latency_s) for o in outcomes] == [("sdxl", 2.0), ("sdxl", 2.0)]
    with pytest.raises(ValueError, match="no workflow 'flux'"):
        _denoiser().run([_Traced(0.0, "flux")], until=20)


def test_a_lora_cache_miss_adds_its_load_time_and_the_disk_read_when_the_host_lacks_it() -> None:
    sim = _denoiser()
    # a (disk + load), a again (hit), b (disk + load), c (disk + load; evicts a from the replica's
    # two slots), a (load from host memory only: the node still holds its file)
    names = ["a", "a", "b", "c", "a"]
    trace = [_Traced(10.0 * i, "sdxl", loras=(n,)) for i, n in enumerate(names)]
    latencies = [o.latency_s for o in sim.run(trace, until=100)]
    assert latencies == pytest.approx([3.3, 2.0, 3.3, 3.3, 2.3])
    assert sim.loads == {"lora": 4, "lora from disk": 3}


def test_a_miss_with_the_replicas_slots_full_pays_the_swap_not_the_load() -> None:
    sim = _denoiser(lora_swap_s=0.05)
    # a and b fill the two slots (load 0.3 + disk 1); c and then a are swapped into the least
    # recently used slot (0.05; a's file still in the node's host memory, c's read from disk)
    names = ["a", "b", "c", "a"]
    trace = [_Traced(10.0 * i, "sdxl", loras=(n,)) for i, n in enumerate(names)]
    latencies = [o.latency_s for o in sim.run(trace, until=100)]
    assert latencies == pytest.approx([3.3, 3.3, 3.05, 2.05])
    assert sim.loads == {"lora": 4, "lora from disk": 3}


def test_a_controlnet_runs_every_step_on_the_denoisers_device_or_crosses_a_link_every_step() -> None:
    trace = [_Traced(0.0, "sdxl", controlnets=("canny",)), _Traced(10.0, "sdxl", controlnets=("canny",))]
    local = _denoiser()
    # its compute (1 s) each time, its load from host memory (0.5 s) the first time only
    assert [o.latency_s for o in local.run(trace, until=100)] == pytest.approx([3.5, 3.0])
    # on another node over a 50 GB/s network (5 us a transfer): 10 steps x (1 GB / 50 GB/s + 5 us)
    network = _denoiser(Link(50e9, 5e-6))
    over_network = [o.latency_s for o in network.run(trace, until=100)]
    assert over_network == pytest.approx([2.0 + 1.0 + 10 * (0.02 + 5e-6)] * 2)
    nvlink = _denoiser(Link(450e9, 2e-6))
    over_nvlink = nvlink.run(trace, until=100)[0].latency_s
    assert over_nvlink is not None and over_nvlink < over_network[0] - 0.15


def test_steps_with_the_same_adapters_share_a_batched_call_and_others_wait() -> None:
    sim = Simulation(
        workflows={"w": [["m"]]},
        models={"m": ModelProfile(1.0, GIB, 1.0, max_batch=4, batch_speedup={2: 1.25, 4: 1.6})},
        units={"u": ["m"]},
        policy=_fixed(["u"]),
    )
    trace = [_Traced(0.0, "w", workflow="w")] * 2 + [_Traced(0.0, "w", workflow="w", loras=("x",))]
    trace += [_Traced(0.0, "w", workflow="w")] * 3
    latencies = [o.latency_s for o in sim.run(trace, until=100)]
    # the first finds the replica idle and starts alone (1 s); then the oldest queued leads a call
    # of 4 (2.5 s, not 4) that the other plain ones ride, past the LoRA one, which goes alone last
    assert latencies == pytest.approx([1.0, 3.5, 4.5, 3.5, 3.5, 3.5])
    assert sim.batches == {4: 1, 1: 2}


def test_trace_runs_are_deterministic() -> None:
    import random

    rng = random.Random(5)
    trace = sorted(
        (
            _Traced(
                rng.uniform(0, 60), "sdxl", controlnets=(f"c{rng.randint(0, 3)}",), loras=(f"l{rng.randint(0, 9)}",)
            )
            for _ in range(20)
        ),
        key=lambda r: r.timestamp,
    )
    first, again = _denoiser().run(trace, until=200), _denoiser().run(trace, until=200)
    assert first == again and all(o.latency_s is not None for o in first)


def test_measured_steps_tell_the_policy_what_time_slicing_made_of_a_step() -> None:
    """A 0.1 s step sharing its GPU with a 10 s loop takes 0.2 s: with `measured_steps` the
    policy is told 0.2 s (as lego up's replicas report their steps), else the profile's 0.1 s."""
    told = {}
    for measured in (False, True):
        sim = Simulation(
            workflows={"long": [["loop"]], "short": [["vae"]]},
            models={"loop": ModelProfile(10.0, GIB, 1.0), "vae": ModelProfile(0.1, GIB, 1.0)},
            units={"ul": ["loop"], "uv": ["vae"]},
            policy=_fixed(["ul", "uv"]),
            gpus=1,
            measured_steps=measured,
        )
        sim.run([(0.0, "long"), (1.0, "short")], until=3.0)
        told[measured] = sim._load("vae").step_s
    assert told == {False: pytest.approx(0.1), True: pytest.approx(0.2)}


def test_a_split_step_waiting_out_its_lora_load_keeps_its_devices() -> None:
    """A group's split step, computed, waits for its LoRA's load (1 s) on its devices; a request
    arriving meanwhile waits for them rather than shrinking a step that has nothing left to run."""
    sim = Simulation(
        workflows={"w": [["m"]]},
        models={"m": ModelProfile(1.0, GIB, 1.0, degree_s={2: 0.55}, adapters=Adapters(lora_load_s=1.0, lora_slots=0))},
        units={"u": ["m"]},
        policy=_fixed(["u"]),
        group_size={"u": 2},
    )
    a, b = sim.run([_Traced(0.0, "w", loras=("x",)), _Traced(0.8, "w", loras=("x",))], until=10)
    assert a.latency_s == pytest.approx(1.55) and b.latency_s == pytest.approx(1.55 - 0.8 + 1.55)


def test_a_new_replica_is_placed_beside_the_least_compute_not_on_the_most_free_memory() -> None:
    """Two GPUs: a busy loop's replica on one, a light encoder's on the other (more memory used).
    The loop's second replica goes beside the encoder, so the two loops never share a GPU."""
    sim = Simulation(
        workflows={"long": [["loop"]], "light": [["enc"]]},
        models={"loop": ModelProfile(10.0, 10 * GIB, 1.0), "enc": ModelProfile(0.05, 40 * GIB, 1.0)},
        units={"ul": ["loop"], "ue": ["enc"]},
        policy=PolicyConfig(slo=Slo(factor=5.0), limits={"ul": Limits(1, 2), "ue": Limits(1, 1)}),
        gpus=2,
    )
    sim.run([(0.0, "long"), (0.1, "long"), (0.2, "light")], until=5.0)
    loops = [p for p in sim.placements()["ul"]]
    assert len(loops) == 2 and len({gpu for p in loops for gpu in p}) == 2


def test_admissions_scale_a_late_stage_before_its_steps_reach_it() -> None:
    """A 20 s encoder stage, then a denoiser: with `admissions` the denoiser's replicas start at
    the burst, so they are loaded by the time the encodings arrive."""
    first_up = {}
    for admissions in (False, True):
        sim = Simulation(
            workflows={"w": [["enc"], ["den"]]},
            models={"enc": ModelProfile(20.0, GIB, 1.0), "den": ModelProfile(2.0, GIB, 10.0)},
            units={"ue": ["enc"], "ud": ["den"]},
            policy=PolicyConfig(slo=Slo(factor=5.0), limits={"ue": Limits(8, 8), "ud": Limits(1, 8)}),
            admissions=admissions,
        )
        outcomes = sim.run([(0.0, "w")] * 8, until=200.0)
        first_up[admissions] = max(o.latency_s or 1e9 for o in outcomes)
    # without: the denoiser scales when 8 encodings land at 20 s (ready at 30 s); with: at once
    assert first_up[True] < first_up[False] - 5.0


def test_samples_count_the_gpus_holding_a_replica_as_the_policy_scales() -> None:
    """`sample_s`: GPUs in use over the run (what bench/diurnal.py plots): one replica holds one
    GPU; a burst scales to a second on the other GPU; after the cooldown, back to one."""
    sim = Simulation(
        workflows={"w": [["m"]]},
        models={"m": ModelProfile(step_s=2.0, memory_bytes=GIB, load_s=1.0)},
        units={"u": ["m"]},
        policy=PolicyConfig(slo=Slo(factor=5.0), cooldown_s=5.0, limits={"u": Limits(1, 2)}),
        gpus=2,
        sample_s=1.0,
    )
    sim.run([(0.0, "w")] * 10, until=60.0)
    used = [g for _, g, _ in sim.samples]
    assert used[0] == 1 and max(used) == 2 and used[-1] == 1
    assert [t for t, _, _ in sim.samples] == [float(t) for t in range(len(sim.samples))]


def test_the_gateways_rule_refuses_what_the_steps_on_their_way_already_fill() -> None:
    """`deadline_s`: a burst of 8 waits at a 1 s encoder stage, the 10 s denoiser's queue still
    empty; each arrival counts the denoise steps of the requests admitted before it, so the 4th
    and later (30 s and more of denoising ahead, past a 25 s deadline) are refused at once."""
    sim = Simulation(
        workflows={"w": [["enc"], ["den"]]},
        models={"enc": ModelProfile(1.0, GIB, 1.0), "den": ModelProfile(10.0, GIB, 1.0)},
        units={"ue": ["enc"], "ud": ["den"]},
        policy=PolicyConfig(limits={"ue": Limits(8, 8), "ud": Limits(1, 1)}),
        deadline_s=lambda i: 25.0,
    )
    outcomes = sim.run([(0.0, "w")] * 8 + [(0.5, "w")], until=200.0)
    assert sim.refused == 6
    assert [o.latency_s is not None for o in outcomes] == [True] * 3 + [False] * 6
    assert [o.latency_s for o in outcomes[:3]] == pytest.approx([11.0, 21.0, 31.0])
