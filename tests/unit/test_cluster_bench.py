"""bench/cluster.py: the mesh and the two baselines of issue 15, built from the sourced profile
(bench/profiles/cluster.json) and replayed on trace requests by the simulator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.cluster import (
    PROFILE,
    TableConfig,
    build,
    combination,
    load_profile,
    mesh,
    pipeline_s,
    poisson_trace,
    scaled,
    solo_s,
    strong_monolith,
    summary_lines,
    table,
)
from bench.traces.record import TraceRequest

P = load_profile()


def test_every_figure_of_the_profile_names_its_source() -> None:
    def leaves(node: object, path: str = "") -> list[tuple[str, object]]:
        if isinstance(node, dict):
            if "value" in node:
                return [(path, node)]
            return [leaf for k, v in node.items() if k not in ("about", "note") for leaf in leaves(v, f"{path}.{k}")]
        return [(path, node)]

    raw = json.loads(Path(PROFILE).read_text())
    for path, leaf in leaves(raw):
        assert isinstance(leaf, dict) and leaf.get("source"), f"{path} has no source"
        source = str(leaf["source"])
        assert source.startswith(("measured", "published", "assumed", "the denoiser's default")), (path, source)


def test_the_research_baseline_runs_a_pipeline_per_combination_the_strong_monolith_one_per_base() -> None:
    trace = [
        TraceRequest(0.0, "sdxl", ("canny",), ("a",)),
        TraceRequest(1.0, "sdxl", ("canny",), ("b",)),
        TraceRequest(2.0, "sdxl", ("canny",), ("a",)),
        TraceRequest(3.0, "sd15"),
    ]
    research = build("research", P, 8, trace)
    assert sorted(research.units) == ["sd15||", "sdxl|canny|a", "sdxl|canny|b"]
    assert research.models[combination(trace[0])].memory_bytes > research.models["sd15||"].memory_bytes
    strong = build("strong", P, 8, trace)
    assert sorted(strong.units) == ["sd15", "sdxl"]
    assert sorted(build("mesh", P, 8, trace).units) == ["encoder", "sd15-unet", "sdxl-unet", "vae"]
    # the research pipelines have their ControlNet's compute in their run; no one waits for a load once warm
    assert research.models["sdxl|canny|a"].step_s == pytest.approx(solo_s(P, trace[0]))


def test_the_strong_monolith_pays_a_loras_load_on_a_cache_miss_only() -> None:
    trace = [TraceRequest(0.0, "sdxl", loras=("x",)), TraceRequest(30.0, "sdxl", loras=("x",))]
    sim = strong_monolith(P, 8, ["sdxl"])
    first, again = sim.run(trace, until=100)
    alone = pipeline_s(P, "sdxl")
    disk = P["denoisers"]["sdxl-unet"]["lora_mib"] * 2**20 / (P["adapters"]["lora_disk_mbps"] * 1e6)
    assert first.latency_s == pytest.approx(alone + P["adapters"]["lora_load_s"] + disk)
    assert again.latency_s == pytest.approx(alone)


def test_a_controlnet_on_another_node_adds_its_residuals_transfer_every_step() -> None:
    request = TraceRequest(0.0, "sdxl", controlnets=("canny",))
    warm = TraceRequest(20.0, "sdxl", controlnets=("canny",))  # its ControlNet already loaded
    local = mesh(P, 8, ["sdxl"]).run([request, warm], until=100)[1].latency_s
    remote = mesh(P, 8, ["sdxl"], controlnet_link="network").run([request, warm], until=100)[1].latency_s
    d, net = P["denoisers"]["sdxl-unet"], P["links"]["network"]
    per_step = net["latency_s"] + d["residual_bytes"] / (net["gbps"] * 1e9)
    assert local is not None and remote is not None
    assert remote - local == pytest.approx(d["steps"] * per_step, abs=1e-6)  # 30 x 2.17 ms
    nvlink = mesh(P, 8, ["sdxl"], controlnet_link="nvlink").run([request, warm], until=100)[1].latency_s
    assert nvlink is not None and local < nvlink < remote


def test_a_recorded_trace_replays_at_the_rate_asked_keeping_its_order() -> None:
    trace = poisson_trace(2.0, 0.0, 500.0, seed=3)
    fast = scaled(trace, 10.0, end=1e9)
    assert len(fast) == len(trace)
    assert len(fast) / fast[-1].timestamp == pytest.approx(10.0, rel=0.02)
    assert [r.loras for r in fast] == [r.loras for r in trace]


def test_the_table_is_deterministic_for_a_seed_and_ends_with_the_issues_line() -> None:
    cfg = TableConfig(gpus=(8,), fractions=(0.3, 0.6), bursts=(2,), warm_s=60.0, phase_s=120.0, seed=5)
    first = table(P, cfg, log=lambda *_: None)
    again = table(P, cfg, log=lambda *_: None)
    for res in (first, again):
        for row in res["8"]["rows"]:
            for system in ("mesh", "research", "strong"):
                row[system].pop("wall_s")
    assert first == again
    best = first["8"]["best"]
    assert set(best) == {"mesh", "research", "strong"} and set(best["mesh"]) == {"3x", "5x", "10x"}
    assert best["mesh"]["10x"]["rate"] >= best["mesh"]["3x"]["rate"]  # a looser SLO is never met at a lower rate
    assert summary_lines(first, cfg)[-1].startswith("research baseline: rate ")


def test_with_warm_fills_each_cell_is_the_systems_best_and_the_research_baseline_runs_without() -> None:
    cfg = TableConfig(
        gpus=(8,), fractions=(0.6,), bursts=(1, 8), warm_s=60.0, phase_s=120.0, seed=5, warm_fills=(0.0, 0.8)
    )
    rows = table(P, cfg, log=lambda *_: None)["8"]["rows"]
    assert [r.get("burst") for r in rows] == [None, 1, 8]
    differs = False
    for row in rows:
        assert "by_fill" not in row["research"]
        for system in ("mesh", "strong"):
            cell = row[system]
            assert set(cell["by_fill"]) == {"0", "0.8"}
            for slo, value in cell["attainment"].items():
                assert value == max(run["attainment"][slo] for run in cell["by_fill"].values())
                assert cell["by_fill"][f"{cell['fill'][slo]:g}"]["attainment"][slo] == value
            differs |= cell["by_fill"]["0"]["attainment"] != cell["by_fill"]["0.8"]["attainment"]
    assert differs  # the warm pool changes what the systems do


def test_the_mesh_with_denoiser_groups_splits_a_lone_request_by_the_parallel_profile() -> None:
    from bench.cluster import Groups, load_ratios

    ratios = load_ratios(Path(PROFILE).parent / "parallel.json")
    request = [TraceRequest(0.0, "sdxl")]
    whole = mesh(P, 8, ["sdxl"]).run(request, until=100)[0]
    grouped = mesh(P, 8, ["sdxl"], groups=Groups(2, "adaptive", ratios))
    split = grouped.run(request, until=100)[0]
    unet = P["models"]["sdxl-unet"]["step_s"]
    assert split.degree == 2 and whole.degree == 1
    assert whole.latency_s is not None and split.latency_s is not None
    assert whole.latency_s - split.latency_s == pytest.approx(unet * (1 - ratios["sdxl-unet"][2]), abs=1e-6)


def test_a_trace_naming_an_unknown_base_model_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"'sd2'.*known: sd15, sdxl"):
        build("mesh", P, 8, [TraceRequest(0.0, "sd2")])


def test_a_recorded_trace_file_is_replayed_at_each_rate_and_resampled_for_bursts(tmp_path) -> None:
    from bench.traces.record import read_jsonl, write_jsonl

    path = tmp_path / "trace.jsonl"
    write_jsonl(path, poisson_trace(1.0, 0.0, 400.0, seed=9))
    recorded = list(read_jsonl(path))
    cfg = TableConfig(gpus=(8,), fractions=(0.5,), bursts=(2,), warm_s=60.0, phase_s=120.0)
    rows = table(P, cfg, recorded, log=lambda *_: None)["8"]["rows"]
    rate_row, burst_row = rows
    assert rate_row["requests"] == pytest.approx(0.5 * 1.82 * 180, rel=0.25)  # half the bound, 180 s
    assert burst_row["requests"] > 0
    assert rate_row["mesh"]["attainment"]["10x"] >= 0.9  # half the bound: served


def test_a_diurnal_day_prints_each_hour_and_the_days_sums(tmp_path) -> None:
    """bench/diurnal.py on a small, short day: a row a trace hour, both plots, the last line."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    args = ["--gpus", "8", "--day-s", "2400", "--load", "0.3", "--systems", "mesh,strong"]
    out = subprocess.run(
        [sys.executable, "bench/diurnal.py", *args, "--out", tmp_path, "--plots", tmp_path],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2:4].isdigit()]
    assert len(rows) == 24
    last = out.strip().splitlines()[-1]
    assert last.startswith("day: mesh attainment ") and "; strong attainment " in last and "GPU-hours" in last
    saved = json.loads((tmp_path / "diurnal-8.json").read_text())["results"]
    assert sum(saved["mesh"]["requests"]) == sum(saved["strong"]["requests"]) > 0  # the same day for both
    assert all(0 < g <= 8 for g in saved["mesh"]["gpus_used"])
    for name in ("cluster-diurnal-8-gpus.png", "cluster-diurnal-8-attainment.png"):
        assert (tmp_path / name).stat().st_size > 0
