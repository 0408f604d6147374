"""bench/fidelity.py without a mesh: the seeded trace, the workflow a trace request runs, and the
simulation built from a measured profile (its solo latencies are the measured ones)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import fidelity
from bench.traces.record import TraceRequest, read_jsonl, write_jsonl

PROFILE = fidelity.Measured(
    solo_s={"sd3": 0.27, "flux": 0.29, "sd3-lora": 0.28},
    step_s={
        "sd3": {"clip-l": 0.003, "clip-g": 0.004, "t5": 0.011, "sd3-transformer": 0.155, "sd3-vae": 0.075},
        "flux": {"clip-l": 0.003, "t5": 0.02, "flux-transformer": 0.175, "flux-vae": 0.07},
        "sd3-lora": {"clip-l": 0.003, "clip-g": 0.004, "t5": 0.011, "sd3-transformer": 0.165, "sd3-vae": 0.075},
    },
    solo_runs=5,
)


def test_a_seed_gives_the_same_trace_and_it_survives_the_jsonl_format(tmp_path: Path) -> None:
    trace = fidelity.short_trace(seed=3, duration_s=10.0, rate=2.5, burst=(3.0, 2.0, 3.0))
    assert trace == fidelity.short_trace(seed=3, duration_s=10.0, rate=2.5, burst=(3.0, 2.0, 3.0))
    assert trace != fidelity.short_trace(seed=4, duration_s=10.0, rate=2.5, burst=(3.0, 2.0, 3.0))
    assert {r.workflow for r in trace} == set(fidelity.MIX)
    assert all(r.loras and r.loras[0].startswith("sd3-lora-") for r in trace if r.workflow == "sd3-lora")
    in_burst = [r for r in trace if 3.0 <= r.timestamp < 5.0]
    assert len(in_burst) / 2.0 > 2.5  # the burst is denser than the base rate
    write_jsonl(tmp_path / "t.jsonl", trace)
    assert list(read_jsonl(tmp_path / "t.jsonl")) == [
        TraceRequest(round(r.timestamp, 6), r.base_model, r.controlnets, r.loras, r.workflow) for r in trace
    ]


@pytest.mark.parametrize(
    ("request_", "workflow"),
    [
        (TraceRequest(0.0, "sd3"), "sd3"),
        (TraceRequest(0.0, "sd3", loras=("sd3-lora-a",)), "sd3-lora"),
        (TraceRequest(0.0, "flux", controlnets=("flux-controlnet",), loras=("x",)), "flux-controlnet-lora"),
        (TraceRequest(0.0, "sdxl", loras=("x",), workflow="sdxl"), "sdxl"),  # its own workflow wins
    ],
)
def test_the_workflow_of_a_trace_request(request_: TraceRequest, workflow: str) -> None:
    assert fidelity.workflow_of(request_) == workflow


def test_the_simulation_holds_the_mesh_units_on_one_device_of_the_machines_cores() -> None:
    sim = fidelity.simulation(PROFILE, list(PROFILE.solo_s), cores=2)
    assert set(sim.units) == {"encoder", "sd3-transformer", "flux-transformer", "vae"}
    sim.run([], until=0.0)
    assert {p for placed in sim.placements().values() for p in placed} == {(0,)}  # any step on any core
    # Two requests at once, one a denoiser each: both denoise at full speed on the two cores (no
    # overhead measured; only the shared encoder and VAE processes make one wait), where on one
    # core the two loops share it.
    pair = [TraceRequest(0.0, "sd3", workflow="sd3"), TraceRequest(0.0, "flux", workflow="flux")]
    one_core = fidelity.simulation(PROFILE, list(PROFILE.solo_s), cores=1)
    for two, one in zip(fidelity.replay_simulated(sim, pair), fidelity.replay_simulated(one_core, pair), strict=True):
        assert two.latency_s is not None and one.latency_s is not None
        assert two.latency_s < PROFILE.solo_s[two.workflow] * 1.4 < one.latency_s
    # Its solo latency is the measured one (the hops take what the models' compute leaves).
    for workflow, solo in PROFILE.solo_s.items():
        alone = fidelity.replay_simulated(sim, [TraceRequest(0.0, workflow, workflow=workflow)])[0]
        assert alone.latency_s == pytest.approx(solo, rel=0.1)


def test_a_burst_beyond_the_cores_misses_slos_in_the_simulation() -> None:
    sim = fidelity.simulation(PROFILE, list(PROFILE.solo_s), cores=2)
    slo = fidelity.slo_of(PROFILE, 5.0)
    calm = fidelity.short_trace(seed=3, duration_s=10.0, rate=1.0)
    burst = [TraceRequest(0.01 * i, "sd3", workflow="sd3") for i in range(40)]
    assert fidelity.attainment(fidelity.replay_simulated(sim, calm), slo) == 1.0
    assert fidelity.attainment(fidelity.replay_simulated(sim, burst), slo) < 0.5
    rows = fidelity.score([(fidelity.replay_simulated(sim, burst), slo)])
    assert [r.name for r in rows] == ["sd3", "total"] and rows[-1].requests == 40


def test_a_trace_this_replay_cannot_run_is_refused_by_name() -> None:
    fidelity.check_replayable([TraceRequest(0.0, "sd3"), TraceRequest(1.0, "flux", loras=("flux-lora-a",))])
    with pytest.raises(ValueError, match="sd3-controlnet"):
        fidelity.check_replayable([TraceRequest(0.0, "sd3", controlnets=("sd3-controlnet",))])
    with pytest.raises(ValueError, match=r"\['sdxl-lora'\] are not in the catalogue"):
        fidelity.check_replayable([TraceRequest(0.0, "sdxl", loras=("x",))])


def test_the_requests_overhead_at_the_traces_rate_slows_steps_that_share_the_cores() -> None:
    """0.1 CPU-s of overhead a request at 5 req/s holds half a core of 2: two steps computing at
    once run 2 / 1.5 slower; one alone runs as fast as ever."""
    from dataclasses import replace

    busy = replace(PROFILE, overhead_cpu_s=0.1)
    sim = fidelity.simulation(busy, list(PROFILE.solo_s), cores=2, rate=5.0)
    assert sim.contention == pytest.approx(2 / 1.5) and sim.cores_per_gpu == 2
    assert fidelity.simulation(busy, list(PROFILE.solo_s), cores=2).contention == 1.0  # no rate: no overhead
    trace = fidelity.short_trace(seed=3, duration_s=10.0, rate=2.0)
    assert fidelity.mean_rate(trace) == pytest.approx(2.0, rel=0.35)
    alone = fidelity.replay_simulated(sim, [TraceRequest(0.0, "sd3", workflow="sd3")])[0]
    assert alone.latency_s == pytest.approx(PROFILE.solo_s["sd3"], rel=0.1)
