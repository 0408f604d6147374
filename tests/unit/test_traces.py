"""Production-shaped traces (bench/traces): reproducible, shaped as the published facts say,
replayable from the published trace's own files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from bench.traces.__main__ import main
from bench.traces.generate import TraceParams, burst_windows, chunks, generate, lines, mix_by_hour, write_trace
from bench.traces.katz import KatzFormatError, load_katz, popularity_map, to_families
from bench.traces.record import read_jsonl, write_jsonl
from bench.traces.stats import read_light, trace_stats
from bench.traces.workflows import FAMILIES, workflow_of
from shared.workflows.catalogue import catalogue

# A compressed day (40 min) so a whole diurnal cycle fits in a fast test.
DAY = TraceParams(hours=24, day_s=2400, mean_rate=40, bursts_per_day=0)
SMALL = TraceParams(hours=2, day_s=2400, mean_rate=20)


def _columns(params: TraceParams, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    parts = list(chunks(params, seed))
    return (
        np.concatenate([c.timestamp for c in parts]),
        np.concatenate([c.family for c in parts]),
        np.concatenate([c.controlnets for c in parts]),
        np.concatenate([c.loras for c in parts]),
    )


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    n = write_trace(a, SMALL, seed=7)
    assert n > 1000
    assert write_trace(b, SMALL, seed=7) == n
    write_trace(c, SMALL, seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_jsonl_round_trip_and_fast_lines_match_the_record_format(tmp_path: Path) -> None:
    requests = list(generate(SMALL, seed=3))
    assert [r.to_json() for r in requests] == list(lines(SMALL, seed=3))
    path = tmp_path / "t.jsonl"
    write_trace(path, SMALL, seed=3)
    assert list(read_jsonl(path)) == requests
    other = tmp_path / "u.jsonl"
    write_jsonl(other, requests)
    assert other.read_bytes() == path.read_bytes()
    stamps = [r.timestamp for r in requests]
    assert stamps == sorted(stamps) and 0 <= stamps[0] and stamps[-1] < SMALL.duration_s


def test_names_follow_the_family_convention_and_adapters_are_distinct() -> None:
    for r in generate(SMALL, seed=1):
        assert r.base_model in FAMILIES
        assert all(c.startswith(f"{r.base_model}/cn-") and len(c.split("cn-")[1]) == 3 for c in r.controlnets)
        assert all(lo.startswith(f"{r.base_model}/lora-") and len(lo.split("lora-")[1]) == 5 for lo in r.loras)
        assert len(set(r.controlnets)) == len(r.controlnets) and len(set(r.loras)) == len(r.loras)
        assert r.workflow == workflow_of(r.base_model, bool(r.controlnets), bool(r.loras))


def test_adapter_statistics_match_the_published_facts() -> None:
    _, family, cns, loras = _columns(DAY, seed=11)
    n = len(family)
    assert 80_000 < n < 112_000  # 40 req/s over 2400 s
    assert (cns[:, 0] >= 0).mean() > 0.98  # > 98% use a ControlNet
    assert (loras[:, 0] >= 0).mean() > 0.95  # > 95% a LoRA
    calls = np.bincount(cns[cns >= 0], minlength=DAY.controlnets)
    top = np.sort(calls)[::-1]
    assert 0.95 <= top[: DAY.controlnets // 10].sum() / calls.sum() <= 0.98  # top 10% take 95-98%
    lora_calls = np.bincount(loras[loras >= 0], minlength=DAY.loras)
    assert (lora_calls > 0).sum() > 5000  # thousands of LoRAs in use, the popular ones far ahead
    assert lora_calls[:10].sum() > 20 * lora_calls[-1000:].sum()
    shares = np.bincount(family, minlength=len(FAMILIES)) / n
    assert shares.argmax() == FAMILIES.index("sdxl") and shares[0] > 0.4


def test_stats_of_a_trace_file_show_the_same_shape(tmp_path: Path) -> None:
    path = tmp_path / "day.jsonl"
    n = write_trace(path, DAY, seed=11)
    s = trace_stats(read_light(path), hour_s=DAY.hour_s)
    assert s.requests == n
    assert s.share_with_controlnet > 0.98 and s.share_with_lora > 0.95
    assert 0.94 <= s.top10_controlnet_share <= 0.98  # over the ControlNets seen, ranked per base model
    assert set(s.base_model_share) == set(FAMILIES)
    assert all(w in catalogue() for w in s.workflow_share)
    assert len(s.hourly_rates) == 23 and s.peak_to_trough is not None


@pytest.mark.parametrize("ratio", [2.0, 4.0])
def test_diurnal_peak_to_trough_is_as_set(ratio: float) -> None:
    params = TraceParams(hours=24, day_s=2400, mean_rate=30, peak_to_trough=ratio, bursts_per_day=0)
    t, *_ = _columns(params, seed=5)
    hourly = np.bincount((t // params.hour_s).astype(int), minlength=24)[:24]
    # Hour averages of the cosine reach ~99% of its amplitude; Poisson noise adds a few percent.
    assert ratio * 0.8 < hourly.max() / hourly.min() < ratio * 1.2
    assert abs(len(t) / params.duration_s - params.mean_rate) < 0.05 * params.mean_rate
    peak_hour = int(np.argmax(hourly))
    assert abs(peak_hour - params.peak_hour) <= 2


def _inside(t: np.ndarray, windows: list[tuple[float, float]]) -> np.ndarray:
    mask = np.zeros(len(t), dtype=bool)
    for start, end in windows:
        mask |= (t >= start) & (t < end)
    return mask


def test_bursts_show_as_rate_jumps() -> None:
    params = TraceParams(hours=1, mean_rate=20, bursts_per_day=48, burst_multiplier=5, burst_s=60, peak_to_trough=1)
    windows = burst_windows(params, seed=2)
    assert len(windows) == 2
    t, *_ = _columns(params, seed=2)
    inside = _inside(t, windows)
    grid = np.arange(0, params.duration_s, 0.01)
    in_s = _inside(grid, windows).sum() * 0.01  # the windows' union, overlapping or not
    rate_in = inside.sum() / in_s
    rate_out = (~inside).sum() / (params.duration_s - in_s)
    assert 4 < rate_in / rate_out < 6
    per_10s = np.bincount((t // 10).astype(int))
    assert per_10s.max() > 3 * np.median(per_10s)


def test_the_mix_drifts_hour_to_hour_but_stays_sdxl_led() -> None:
    mix = mix_by_hour(DAY, seed=4)
    assert mix.shape == (25, len(FAMILIES))
    assert np.allclose(mix.sum(axis=1), 1)
    assert np.abs(np.diff(mix, axis=0)).max() > 0.02  # it moves
    assert mix[:, 0].mean() > 0.4
    still = mix_by_hour(TraceParams(drift_sigma=0, hours=24), seed=4)
    assert np.allclose(still, still[0])


def test_params_are_checked() -> None:
    with pytest.raises(ValueError, match="mean_rate"):
        TraceParams(mean_rate=0)
    with pytest.raises(ValueError, match="counts sum to 1"):
        TraceParams(lora_counts=(0.5, 0.2))
    with pytest.raises(ValueError, match="base_models"):
        TraceParams(base_models=("sd2",))


def test_workflow_of_names_only_catalogue_workflows() -> None:
    names = set(catalogue())
    for base in FAMILIES:
        for cn in (False, True):
            for lora in (False, True):
                assert workflow_of(base, cn, lora) in names
    assert workflow_of("sd3", True, True) == "sd3-controlnet-lora"
    assert workflow_of("flux", False, True) == "flux-lora"
    assert workflow_of("sd35-large", True, False) == "sd35-large-controlnet"
    assert workflow_of("sdxl", True, True) == "sdxl"
    assert workflow_of("sd15", False, False) == "sd15"
    with pytest.raises(ValueError, match="unknown base model"):
        workflow_of("sd2", True, True)


# The published file's own layout (github.com/modelscope/Katz, trace/): one JSON array.
KATZ_SAMPLE = [
    {"timestamp": 1700000010.5, "ip": "10.0.0.2", "scene_id": "A", "base_model_id": "b1",
     "controlnets": ["c3"], "loras": ["l9", "l2"]},
    {"timestamp": 1700000000.0, "ip": "10.0.0.1", "scene_id": "A", "base_model_id": "b1",
     "controlnets": ["c3", "c1"], "loras": None},
    {"timestamp": 1700000004.25, "ip": "10.0.0.3", "scene_id": "B", "base_model_id": None,
     "controlnets": None, "loras": ["l5"]},
    {"timestamp": 1700000007.0, "ip": "10.0.0.1", "scene_id": "A", "base_model_id": "b2",
     "controlnets": [], "loras": ["l1"]},
]  # fmt: skip


def test_katz_loader_reads_the_published_layout(tmp_path: Path) -> None:
    path = tmp_path / "diffusion_model_request_trace.json"
    path.write_text(json.dumps(KATZ_SAMPLE))
    rs = load_katz(path)
    assert [r.timestamp for r in rs] == [0.0, 4.25, 7.0, 10.5]
    assert [r.base_model for r in rs] == ["b1", "unknown", "b2", "b1"]
    assert rs[0].controlnets == ("c3", "c1") and rs[0].loras == ()
    assert rs[1].controlnets == () and rs[1].loras == ("l5",)
    assert rs[0].extra == {"ip": "10.0.0.1", "scene_id": "A"} and rs[0].workflow is None
    a = load_katz(path, service="A")
    assert [r.timestamp for r in a] == [0.0, 7.0, 10.5]
    mapped = to_families(a, popularity_map(a))
    assert [r.base_model for r in mapped] == ["sdxl", "sd15", "sdxl"]
    assert mapped[0].controlnets == ("sdxl/c3", "sdxl/c1") and mapped[0].workflow == "sdxl"
    assert mapped[0].extra["trace_base_model"] == "b1"
    # JSON lines of the same objects, and CSV with variant column names, read the same
    jl = tmp_path / "t.jsonl"
    jl.write_text("\n".join(json.dumps(o) for o in KATZ_SAMPLE) + "\n")
    assert load_katz(jl) == rs
    cv = tmp_path / "t.csv"
    with open(cv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["time", "ip", "scene_id", "base_model", "controlnet_ids", "lora_ids"])
        for o in KATZ_SAMPLE:
            w.writerow(
                [int(float(str(o["timestamp"])) * 1000), o["ip"], o["scene_id"], o["base_model_id"] or "",
                 json.dumps(o["controlnets"]) if o["controlnets"] is not None else "",
                 ";".join(o["loras"] or [])]
            )  # fmt: skip
    assert [(r.timestamp, r.base_model, r.controlnets, r.loras) for r in load_katz(cv)] == [
        (r.timestamp, r.base_model, r.controlnets, r.loras) for r in rs
    ]


def test_katz_loader_rejects_a_file_that_does_not_match(tmp_path: Path) -> None:
    no_loras = tmp_path / "a.json"
    no_loras.write_text(json.dumps([{"timestamp": 1.0, "base_model_id": "b", "controlnets": []}]))
    with pytest.raises(KatzFormatError, match=r"record 0: no 'loras' column.*expected timestamp"):
        load_katz(no_loras)
    bad_time = tmp_path / "b.json"
    bad_time.write_text(json.dumps([{"timestamp": "noon", "controlnets": [], "loras": []}]))
    with pytest.raises(KatzFormatError, match="record 0"):
        load_katz(bad_time)
    broken = tmp_path / "c.json"
    broken.write_text('[{"timestamp": 1')
    with pytest.raises(KatzFormatError, match="not valid JSON"):
        load_katz(broken)
    wrong_csv = tmp_path / "d.csv"
    wrong_csv.write_text("when,model\n1,b\n")
    with pytest.raises(KatzFormatError, match="lacks"):
        load_katz(wrong_csv)
    assert main(["katz", str(wrong_csv), "--out", str(tmp_path / "x.jsonl")]) == 2
    no_scene = tmp_path / "e.json"
    no_scene.write_text(json.dumps([{"timestamp": 1, "controlnets": [], "loras": []}]))
    with pytest.raises(KatzFormatError, match="scene_id"):
        load_katz(no_scene, service="A")
    assert main(["stats", str(no_scene)]) == 2  # a Katz file is not our JSONL: said, not a traceback


def test_cli_generates_and_prints_stats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t.jsonl"
    argv = ["generate", "--hours", "2", "--day-s", "2400", "--rate", "20", "--seed", "3", "--out", str(out)]
    assert main(argv) == 0
    assert out.read_bytes() == b"".join((line + "\n").encode() for line in lines(SMALL, seed=3))
    assert main(["stats", str(out), "--hour-s", "100"]) == 0
    text = capsys.readouterr().out
    for figure in ("requests", "mean rate", ">=1 ControlNet", ">=1 LoRA", "top 10% ControlNets", "base sdxl"):
        assert figure in text
    assert main(["generate", "--rate", "-1", "--out", str(out)]) == 2
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0 and "--peak-to-trough" in capsys.readouterr().out


def test_cli_converts_a_katz_file(tmp_path: Path) -> None:
    src, out = tmp_path / "k.json", tmp_path / "k.jsonl"
    src.write_text(json.dumps(KATZ_SAMPLE))
    assert main(["katz", str(src), "--out", str(out), "--families"]) == 0
    rs = list(read_jsonl(out))
    assert len(rs) == 4 and all(r.workflow in catalogue() for r in rs if r.base_model != "unknown")
    assert rs[0].extra["scene_id"] == "A"
