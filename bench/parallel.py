"""What splitting one request over a group's devices buys, and when (issue 14).

On this CPU: a group of 2 single-thread workers (`services/denoiser/group`: the leader in this
process, coordinating only, and 2 follower processes, one per device) against 2 independent single-thread
replicas (two processes, each a plain single-device denoiser running one request at a time
from one shared queue), the same total threads, on tiny and real-width models:

(a) one request's latency per degree: alone (`run_loop` in this process: the unsplit
    request), on the group at degree 1 and at degree 2 (a CFG split by rows for SD3 with
    guidance > 1, a token split for Flux); the per-step exchange (the wire round trip of a
    split's part and answer, measured alone, and what a split step adds beyond half an unsplit
    one); and how close the split request's latents are to the unsplit ones.
(b) a closed-loop load sweep (1, 2, 4, 8 clients, each sending its next request when its last
    came back): throughput and p50/p99 latency for the group always splitting, never
    splitting and adaptive (`shared/parallel_policy.py`), and for the 2 replicas. The systems
    take turns at each load point, in a rotated order per repeat; the spread is the half-range
    of the repeats' throughputs. Throughput is the steady rate, without the ramp and the drain
    (between the C-th and the (N - C)-th of a run's N answers, C clients:
    `parallel_systems.steady_rate`); the rate over the whole run is printed beside it.

The last line: `adaptive vs best fixed: R`, R the lowest over the swept cases' load points of
adaptive's throughput over the best fixed choice's (always, never on the group, or the
replicas: never split, as a plain replica runs it).

    python bench/parallel.py            # the CPU run (about 11 minutes on a quiet 2-core box)
    python bench/parallel.py --quick    # a 1-minute smoke run
    python bench/parallel.py --full-size --device cuda --size 1024 --steps 28   # a lent GPU machine

`--full-size`: SD3-Medium's and Flux.1-dev's published architectures (random weights, bf16 on
a GPU; `--max-layers` caps the depth for a CPU smoke run). With one GPU a group of 2 cannot
form (NCCL needs a GPU per rank), so there: the unsplit step; SD3's CFG split run in one
process (its two row halves one after the other, exactly the parts the group would send, each
timed: one device's compute) with its latents against the unsplit ones; and the exchange of a
split's part through host memory (the group's channel between two processes, plus the
device-host copies), as the group sends it. With 2 GPUs or more, the group itself as on the
CPU, and the sweep with `--sweep`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.parallel_systems import (  # noqa: E402
    Case,
    GroupSystem,
    Machine,
    Replicas,
    closed_loop,
    measure_exchange,
    percentile,
    real_width_dir,
    request_inputs,
    run_alone,
)
from shared.logs import quiet_libraries  # noqa: E402
from shared.settings import Settings  # noqa: E402

SYSTEMS = ("always", "never", "adaptive", "replicas")
FIXED = ("always", "never", "replicas")
PROFILE = ROOT / "bench" / "profiles" / "parallel.json"


def cpu_cases(args: argparse.Namespace) -> list[tuple[Case, bool]]:
    """(case, swept) for the CPU run: the zoo's tiny SD3 and Flux, SD3 at real width (the
    issue's target), Flux at real width for its latency only (a step of it takes seconds)."""
    sd3, flux = "sd3-transformer", "flux-transformer"
    if args.quick:
        return [
            (Case("sd3 tiny", sd3, 128, 8, 77, 5.0), True),
            (Case("flux tiny", flux, 128, 8, 77, 3.5), False),
            (Case("sd3 real width, 1 layer", sd3, 128, 2, 77, 5.0, layers=1), False),
        ]
    cases = [
        (Case("sd3 tiny", sd3, 256, 10, 77, 5.0), True),
        (Case("flux tiny", flux, 256, 10, 77, 3.5), True),
        (
            Case(f"sd3 real width, {args.max_layers or 2} layers", sd3, 256, 2, 77, 5.0, layers=args.max_layers or 2),
            True,
        ),
    ]
    if args.real_flux:
        cases.append((Case("flux real width, 1+1 layers", flux, 256, 2, 77, 3.5, layers=1), False))
    return cases


def full_size_cases(args: argparse.Namespace) -> list[tuple[Case, bool]]:
    """SD3-Medium (its T5 length: 256 tokens, after CLIP's 77) and Flux.1-dev (512)."""
    depth = args.max_layers or 0
    return [
        (Case("SD3-Medium", "sd3-transformer", args.size, args.steps, 256, 7.0, layers=depth), args.sweep),
        (Case("Flux.1-dev", "flux-transformer", args.size, args.steps, 512, 3.5, layers=depth), args.sweep),
    ]


def settle(out: Any) -> Any:
    """Wait for a result's device work (the loops return the latents where they were computed)."""
    import torch

    if isinstance(out, torch.Tensor) and out.is_cuda:
        torch.cuda.synchronize(out.device)
    return out


def timed(fn: Any, *a: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = settle(fn(*a))
    return time.perf_counter() - t0, out


def fidelity(split: Any, unsplit: Any) -> dict:
    diff = (split.float() - unsplit.float()).abs()
    return {"max_abs_diff": float(diff.max()), "max_abs": float(unsplit.float().abs().max())}


def per_degree(
    case: Case, bundle: Any, group: GroupSystem, repeats: int, machine: Machine, max_others: float, retries: int
) -> dict:
    """(a): one request alone, on the group at degree 1 and at degree 2, interleaved (after the
    machine is quiet); medians, and the share of the CPU others took meanwhile."""

    def on_group(mode: str) -> Any:
        def run(seed: int) -> Any:
            group.use(mode)
            out = group.submit(seed).result(timeout=3600)
            if group.degrees != [1 if mode == "never" else 2]:
                raise RuntimeError(f"{case.name}: mode {mode} ran at degree(s) {group.degrees}")
            return out

        return run

    runs = {
        "alone": lambda seed: run_alone(bundle, case, seed),
        "degree_1": on_group("never"),
        "degree_2": on_group("always"),
    }
    for run in runs.values():
        settle(run(1))  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    outs: dict[str, Any] = {}
    others = []
    while len(others) < repeats:
        machine.wait_quiet()
        took_now = {}
        for name, run in runs.items():
            took_now[name], outs[name] = timed(run, 7)
        share = machine.others()
        if share > max_others and retries > 0:  # others disturbed this repeat: run it again
            retries -= 1
            continue
        for name, took in took_now.items():
            times[name].append(took)
        others.append(share)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "seconds": med,
        "samples_s": times,
        "others_cpu_share": others,
        "ratio": {"degree_1": med["degree_1"] / med["alone"], "degree_2": med["degree_2"] / med["alone"]},
        "step_s": {"alone": med["alone"] / case.steps, "degree_2": med["degree_2"] / case.steps},
        "overhead_per_step_s": (med["degree_2"] - med["alone"] / 2) / case.steps,
        "fidelity_degree_2": fidelity(outs["degree_2"].cpu(), outs["alone"].cpu()),
        "fidelity_degree_1": fidelity(outs["degree_1"].cpu(), outs["alone"].cpu()),
    }


def split_in_process(bundle: Any, case: Case, seed: int) -> tuple[Any, float]:
    """One GPU: the request with every call cut by rows as a CFG split cuts it, the parts run one
    after another here; its latents, and the seconds of the slower part summed over the calls
    (one device's compute in a group of 2)."""
    import torch

    from services.denoiser.denoise import denoise_loop
    from services.denoiser.group.split import layout, merge, split
    from services.denoiser.loop import call_transformer

    loop = denoise_loop(bundle, request_inputs(bundle, case, seed))
    device_s = 0.0
    with torch.inference_mode():
        call = next(loop)
        while True:
            how = layout(2, call, by_tokens=False)
            if how is None:
                raise ValueError(f"{case.name}: no rows to split (a token split needs a group of 2 devices)")
            outs, worst = [], 0.0
            for part in split(call, how):
                took, out = timed(call_transformer, bundle.transformer, part.call)
                outs.append(out)
                worst = max(worst, took)
            device_s += worst
            try:
                call = loop.send(merge(outs, how))
            except StopIteration as done:
                return done.value, device_s


def per_degree_one_gpu(case: Case, bundle: Any, exchange_s: float, repeats: int) -> dict:
    """(a) on one GPU: the unsplit request; for a CFG case its split run in-process (one
    device's compute) plus the measured exchange per step: a projected degree-2 time."""
    settle(run_alone(bundle, case, 1))
    alone, outs = [], {}
    for _ in range(repeats):
        took, outs["alone"] = timed(run_alone, bundle, case, 7)
        alone.append(took)
    result: dict[str, Any] = {"seconds": {"alone": statistics.median(alone)}, "samples_s": {"alone": alone}}
    result["step_s"] = {"alone": result["seconds"]["alone"] / case.steps}
    if case.guidance <= 1 or case.model_id.startswith("flux"):
        result["note"] = "token split: needs a group of 2 GPUs"
        return result
    split_request(bundle, case)  # warm-up
    device_s, wall = [], []
    for _ in range(repeats):
        took, (latents, compute) = timed(split_request, bundle, case)
        device_s.append(compute)
        wall.append(took)
    projected = statistics.median(device_s) + case.steps * exchange_s
    result["seconds"] |= {"one_device_of_split": statistics.median(device_s), "projected_degree_2": projected}
    result["ratio"] = {"degree_2_projected": projected / result["seconds"]["alone"]}
    result["fidelity_degree_2"] = fidelity(latents.cpu(), outs["alone"].cpu())
    return result


def split_request(bundle: Any, case: Case) -> tuple[Any, float]:
    return split_in_process(bundle, case, 7)


# -- (b) the load sweep ----------------------------------------------------------------------------


def requests_per_client(load: int, alone_s: float, args: argparse.Namespace) -> int:
    """Enough requests that a load point lasts about `args.point_s` never split (two devices
    busy from 2 clients on) and gives each busy device `args.per_device` requests, and at least
    `args.per_client` for each client."""
    devices = min(load, 2)
    for_duration = -(-args.point_s * devices // (alone_s * load))
    return int(max(args.per_client, for_duration, -(-args.per_device * devices // load)))


def sweep(
    case: Case, systems: dict[str, Any], alone_s: float, args: argparse.Namespace, machine: Machine
) -> list[dict]:
    """Every system at every load point, `args.repeats` times, the systems' order rotated per
    repeat; a run during which others took more than `args.max_others` of the CPU is run again
    (up to `args.retries` times; the last one is kept, its share recorded)."""
    for name, system in systems.items():  # every device of every system warm before timing
        system.use("never" if name == "replicas" else name)
        closed_loop(system.submit, 2, 1, 0)
    runs = []
    names = list(systems)
    seed = 1000
    for rep in range(args.repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for load in args.loads:
            per_client = requests_per_client(load, alone_s, args)
            for name in order:
                system = systems[name]
                attempts = 0
                while True:
                    system.use("never" if name == "replicas" else name)
                    waited = machine.wait_quiet()
                    result = closed_loop(system.submit, load, per_client, seed)
                    others = machine.others()
                    seed += load * per_client
                    attempts += 1
                    if others <= args.max_others or attempts > args.retries:
                        break
                used = Counter(system.degrees) if name != "replicas" else Counter(system.served)
                work = "requests by degree" if name != "replicas" else "requests by replica"
                result |= {"system": name, "load": load, "repeat": rep, work: dict(used), "attempts": attempts}
                result |= {"others_cpu_share": others, "waited_for_quiet_s": waited}
                if name != "replicas":
                    result["trace"] = system.trace
                runs.append(result)
                print(
                    f"  {case.name}: {load} client(s), {name:>8}, repeat {rep + 1}: {result['throughput_rps']:.3f} rps"
                    f" ({work}: {dict(sorted(used.items()))}; others took {others:.0%} of the CPU"
                    f"{f', attempt {attempts}' if attempts > 1 else ''})",
                    flush=True,
                )
    return runs


def summarize(runs: list[dict], max_others: float) -> dict:
    """Per load point: each system's mean throughput, spread, p50/p99; adaptive against the best
    fixed. A run during which others took more than `max_others` of the CPU (every attempt of it
    disturbed) counts only where a system has no undisturbed run at that point."""
    points: dict[int, dict] = {}
    for load in sorted({r["load"] for r in runs}):
        here = [r for r in runs if r["load"] == load]
        systems = {}
        for name in sorted({r["system"] for r in here}, key=SYSTEMS.index):
            mine = [r for r in here if r["system"] == name]
            used = [r for r in mine if r["others_cpu_share"] <= max_others] or mine
            tput = [r["throughput_rps"] for r in used]
            lat = [x for r in used for x in r["latencies_s"]]
            mean = statistics.mean(tput)
            systems[name] = {
                "throughput_rps": mean,
                "makespan_rps": statistics.mean(r.get("makespan_rps", r["throughput_rps"]) for r in used),
                "spread": (max(tput) - min(tput)) / 2 / mean,
                "p50_s": percentile(lat, 50),
                "p99_s": percentile(lat, 99),
                "requests": len(lat),
                "runs": len(used),
                "runs_left_out": len(mine) - len(used),
                "others_cpu_share_max": max(r["others_cpu_share"] for r in used),
            }
        best = max(FIXED, key=lambda n: systems[n]["throughput_rps"])
        best_group = max(("always", "never"), key=lambda n: systems[n]["throughput_rps"])
        per_repeat = []
        for rep in sorted({r["repeat"] for r in here}):
            by = {r["system"]: r for r in here if r["repeat"] == rep}
            if all(r["others_cpu_share"] <= max_others for r in by.values()):
                per_repeat.append(by["adaptive"]["throughput_rps"] / max(by[n]["throughput_rps"] for n in FIXED))
        noise = max(s["spread"] for s in systems.values())
        ratio = systems["adaptive"]["throughput_rps"] / systems[best]["throughput_rps"]
        whole_run = systems["adaptive"]["makespan_rps"] / max(systems[n]["makespan_rps"] for n in FIXED)
        points[load] = {
            "systems": systems,
            "best_fixed": best,
            "adaptive_over_best": ratio,
            "adaptive_over_best_whole_run": whole_run,
            "adaptive_over_best_on_group": systems["adaptive"]["throughput_rps"]
            / systems[best_group]["throughput_rps"],
            "per_repeat_ratios": per_repeat,
            "noise": noise,
            "others_cpu_share_max": max(s["others_cpu_share_max"] for s in systems.values()),
            "verdict": "ok" if ratio >= 1 - noise else "below, beyond the noise",
        }
    return points


# -- the run ---------------------------------------------------------------------------------------


def case_settings(case: Case, args: argparse.Namespace) -> tuple[Case, Settings]:
    base = Settings.from_env(device=args.device, dtype=args.dtype, torch_threads=args.threads, log_level="WARNING")
    if case.layers is None:
        return case, base
    case = replace(case, models_dir=real_width_dir(case, base))
    return case, replace(base, models_dir=case.models_dir)


def run_case(case: Case, swept: bool, args: argparse.Namespace) -> dict:

    from services.denoiser.group.runtime import rank_device
    from shared.zoo import load_denoiser

    case, settings = case_settings(case, args)
    machine = Machine(patience_s=args.patience)
    grouped = not one_device(args)
    started = time.perf_counter()
    bundle = load_denoiser(case.model_id, settings)
    peer = rank_device(args.device, 1) if grouped else "cpu"
    machine.wait_quiet()
    exchange = measure_exchange(
        case, bundle, args.device if grouped else "cpu", peer, args.threads, args.exchange_rounds
    )
    exchange["others_cpu_share"] = machine.others()
    if not grouped:
        exchange["host_copies_s"] = host_copies_s(case, bundle)
    result: dict[str, Any] = {"case": asdict(case), "exchange": exchange}
    if not grouped:
        step_exchange = exchange["median_s"] + exchange["host_copies_s"]
        result["per_degree"] = per_degree_one_gpu(case, bundle, step_exchange, args.degree_repeats)
        return result
    group = GroupSystem(case, settings, bundle, world=2, max_batch=args.max_batch)
    try:
        result["per_degree"] = per_degree(
            case, bundle, group, args.degree_repeats, machine, args.max_others, args.retries * args.degree_repeats
        )
        print_degree_row(case, result)
        if swept:
            replicas = Replicas(case, settings, count=2)
            try:
                systems = {"always": group, "never": group, "adaptive": group, "replicas": replicas}
                alone_s = result["per_degree"]["seconds"]["alone"]
                result["sweep_runs"] = sweep(case, systems, alone_s, args, machine)
            finally:
                replicas.close()
            result["sweep"] = summarize(result["sweep_runs"], args.max_others)
    finally:
        group.close()
    result["took_s"] = time.perf_counter() - started
    return result


def one_device(args: argparse.Namespace) -> bool:
    """Whether no group can form: one GPU (or `--one-device`, to try that path on a CPU)."""
    import torch

    return args.one_device or (args.device.startswith("cuda") and torch.cuda.device_count() < 2)


def host_copies_s(case: Case, bundle: Any) -> float:
    """One GPU: the copies an exchange through host memory adds to the channel's round trip
    (measured between two CPU processes): the part onto the far GPU, and its
    answer (latent-sized) off it and back onto this one."""

    from bench.parallel_systems import tensors_of
    from services.denoiser.denoise import denoise_loop
    from services.denoiser.group.split import Layout, layout, split

    first = next(denoise_loop(bundle, request_inputs(bundle, case, 0)))
    how: Layout | None = layout(2, first, by_tokens=True)
    assert how is not None
    part = split(first, how)[1]
    on_host = [t.cpu() for t in tensors_of(part.call.batched)]
    answer = part.call.batched["hidden_states"]
    took = []
    for _ in range(5):
        t0 = time.perf_counter()
        for t in on_host:
            t.to(answer.device)
        settle(answer.cpu().to(answer.device))
        took.append(time.perf_counter() - t0)
    return statistics.median(took[1:])


# -- what is printed and written -------------------------------------------------------------------


def shape_of(case: Case) -> str:
    text = case.text_len + (77 if case.model_id.startswith("sd3") else 0)
    return f"{case.size} px, {case.steps} steps, {text} text tokens, guidance {case.guidance:g}"


def print_degree_header() -> None:
    print("\n(a) one request's latency per degree (medians; ratios against the request alone)")
    print(
        "| model | shape | alone s | group d1 s | group d2 s | **d2 / alone** | d1 / alone | step alone s"
        " | step d2 s | d2 step - half alone step | wire round trip (sent / back) | max abs diff d2 vs alone |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")


def print_degree_row(case: Case, result: dict) -> None:
    d, x = result["per_degree"], result["exchange"]
    sec, ratio = d["seconds"], d.get("ratio", {})
    fid = d.get("fidelity_degree_2")
    d2 = sec.get("degree_2", sec.get("projected_degree_2"))
    d2_ratio = ratio.get("degree_2", ratio.get("degree_2_projected"))
    projected = " (projected)" if "projected_degree_2" in sec else ""
    wire = f"{x['median_s'] * 1e3:.2f} ms ({x['bytes_sent'] / 2**20:.2f} / {x['bytes_back'] / 2**20:.3f} MiB)"
    if "host_copies_s" in x:  # one GPU: through host memory, the copies on and off the device added
        wire += f" + {x['host_copies_s'] * 1e3:.2f} ms of device-host copies"
    cells = [
        case.name,
        shape_of(case),
        f"{sec['alone']:.3f}",
        f"{sec['degree_1']:.3f}" if "degree_1" in sec else "-",
        "-" if d2 is None else f"{d2:.3f}{projected}",
        "-" if d2_ratio is None else f"**{d2_ratio:.3f}**{projected}",
        f"{ratio['degree_1']:.3f}" if "degree_1" in ratio else "-",
        f"{d['step_s']['alone']:.4f}",
        f"{d['step_s']['degree_2']:.4f}" if "degree_2" in d["step_s"] else "-",
        f"{d['overhead_per_step_s'] * 1e3:+.1f} ms" if "overhead_per_step_s" in d else "-",
        wire,
        f"{fid['max_abs_diff']:.2e} (of {fid['max_abs']:.2f})" if fid else d.get("note", "-"),
    ]
    print("| " + " | ".join(cells) + " |", flush=True)


def print_sweep(case: Case, points: dict) -> None:
    print(f"\n(b) {case.name} ({shape_of(case)}): closed loop, throughput (mean of repeats, ± half-range) and latency")
    print("(req/s: steady, without the first and last answer per client; whole run: ramp and drain included)")
    print("| clients | system | req/s | ± | whole run req/s | p50 s | p99 s | requests (runs) | others' CPU share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for load, point in points.items():
        for name, s in point["systems"].items():
            tput = f"{s['throughput_rps']:.3f} | {s['spread'] * 100:.1f}% | {s.get('makespan_rps', 0.0):.3f}"
            left = f", {s['runs_left_out']} disturbed left out" if s["runs_left_out"] else ""
            runs = f"{s['requests']} ({s['runs']}{left})"
            print(
                f"| {load} | {name} | {tput} | {s['p50_s']:.3f} | {s['p99_s']:.3f} | {runs}"
                f" | {s['others_cpu_share_max']:.0%} |"
            )
    print(
        "| clients | adaptive req/s | best fixed | its req/s | **adaptive / best** | per repeat | noise"
        " | others' CPU share (max) | verdict | adaptive / best of always, never | whole run: adaptive / best |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for load, point in points.items():
        a, best = point["systems"]["adaptive"], point["systems"][point["best_fixed"]]
        reps = ", ".join(f"{r:.3f}" for r in point["per_repeat_ratios"]) or "-"
        print(
            f"| {load} | {a['throughput_rps']:.3f} | {point['best_fixed']} | {best['throughput_rps']:.3f}"
            f" | **{point['adaptive_over_best']:.3f}** | {reps} | ±{point['noise'] * 100:.1f}%"
            f" | {point['others_cpu_share_max']:.0%} | {point['verdict']}"
            f" | {point['adaptive_over_best_on_group']:.3f} | {point.get('adaptive_over_best_whole_run', 0.0):.3f} |"
        )


def update_profile(results: list[dict]) -> None:
    """Write the measured degree-2 ratios into bench/profiles/parallel.json's `measured_on_this_cpu`
    (same keys as `models`): the real-width case's where there is one, else the tiny one's; the
    note names the other cases' figures."""
    profile = json.loads(PROFILE.read_text())
    by_model: dict[str, list[dict]] = {}
    for r in results:
        if "degree_2" in r["per_degree"].get("ratio", {}):
            by_model.setdefault(r["case"]["model_id"], []).append(r)
    measured: dict[str, dict] = {}
    for model_id, rs in by_model.items():
        chosen = max(rs, key=lambda r: r["case"]["layers"] is not None)
        case = chosen["case"]
        split = "CFG split (rows)" if model_id.startswith("sd3") else "token split (sequence)"
        others = "; ".join(
            f"{r['case']['name']}: {r['per_degree']['ratio']['degree_2']:.3f}" for r in rs if r is not chosen
        )
        measured[model_id] = {
            "2": {
                "ratio": round(chosen["per_degree"]["ratio"]["degree_2"], 3),
                "source": "measured on this CPU",
                "note": f"bench/parallel.py, {case['name']} ({shape_of(Case(**case))}), {split} over 2 single-thread"
                " processes against the request alone on one thread" + (f"; also {others}" if others else ""),
            }
        }
    profile["measured_on_this_cpu"] = measured
    PROFILE.write_text(json.dumps(profile, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 1-minute smoke run (small shapes, 1 repeat)")
    parser.add_argument("--device", default=os.environ.get("LEGO_DEVICE", "cpu"))
    parser.add_argument("--dtype", default=os.environ.get("LEGO_DTYPE", "auto"))
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of every worker (leader, follower, replica)"
    )
    parser.add_argument("--full-size", action="store_true", help="SD3-Medium and Flux.1-dev at their published sizes")
    parser.add_argument("--max-layers", type=int, default=0, help="cap the real-width models' depth (CPU: default 2)")
    parser.add_argument("--size", type=int, default=1024, help="with --full-size: the image size")
    parser.add_argument("--steps", type=int, default=28, help="with --full-size: denoising steps")
    parser.add_argument("--sweep", action="store_true", help="with --full-size: the load sweep too (needs 2 GPUs)")
    parser.add_argument("--one-device", action="store_true", help="time as on one GPU (no group), e.g. on a CPU")
    parser.add_argument(
        "--patience", type=float, default=60, help="seconds to wait, before each timed run, for others to leave the CPU"
    )
    parser.add_argument("--cases", nargs="+", help="run only the cases whose name holds one of these (e.g. 'sd3 real')")
    parser.add_argument("--real-flux", action="store_true", help="real-width Flux's latency too (CPU run, ~2 min)")
    parser.add_argument("--loads", type=int, nargs="+", default=[1, 2, 4, 8], help="clients of the load points")
    parser.add_argument(
        "--per-client",
        type=int,
        default=3,
        help="requests each client sends at a load point, at least (3: the steady window, without the first "
        "and last answer per client, holds one per client)",
    )
    parser.add_argument("--point-s", type=float, default=1.0, help="seconds a load point lasts never split, about")
    parser.add_argument("--max-others", type=float, default=0.1, help="run again if others took more of the CPU")
    parser.add_argument("--retries", type=int, default=2, help="times a run others disturbed is run again, at most")
    parser.add_argument("--per-device", type=int, default=4, help="requests for each busy device at a load point")
    parser.add_argument("--repeats", type=int, default=2, help="passes over the load points")
    parser.add_argument("--degree-repeats", type=int, default=3, help="timed requests per degree in (a)")
    parser.add_argument("--exchange-rounds", type=int, default=20, help="timed round trips of the exchange alone")
    parser.add_argument(
        "--max-batch", type=int, default=1, help="the group's step-level batching (1: none, as a CPU replica)"
    )
    parser.add_argument(
        "--update-profile", action="store_true", help=f"write the ratios into {PROFILE.relative_to(ROOT)}"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--summarize", metavar="JSON", help="print a finished run's tables again from its raw JSON")
    args = parser.parse_args()
    if args.summarize:
        resummarize(args)
        return
    if args.quick:
        args.loads, args.per_client, args.per_device = [1, 2], 1, 2
        args.repeats, args.degree_repeats, args.exchange_rounds = 1, 1, 5
        args.patience, args.point_s, args.retries = min(args.patience, 5), 0.5, 0
    quiet_libraries()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Every worker gets `threads` torch threads: this process (the leader) here, the replicas by
    # LEGO_TORCH_THREADS; a follower does not read LEGO_TORCH_THREADS (yet), but torch reads
    # OMP_NUM_THREADS when it starts, and the followers inherit this environment.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    cases = full_size_cases(args) if args.full_size else cpu_cases(args)
    if args.cases:
        cases = [(case, swept) for case, swept in cases if any(c.lower() in case.name.lower() for c in args.cases)]
    print(
        f"bench/parallel.py on {args.device} (torch {torch.__version__}, {os.cpu_count()} CPUs): a group of 2 workers"
        f" of {args.threads} thread(s) against 2 replicas of {args.threads}; max batch {args.max_batch}; no deadlines"
        " (the policy's fair share decides, its deadline rescue is not exercised)",
        flush=True,
    )
    t0 = time.perf_counter()
    results = []
    print_degree_header()
    for case, swept in cases:
        results.append(run_case(case, swept, args))
        if one_device(args):
            print_degree_row(Case(**results[-1]["case"]), results[-1])
    print_summary(results, args, time.perf_counter() - t0)


def print_summary(results: list[dict], args: argparse.Namespace, took: float) -> None:
    """The sweeps' tables, the raw JSON (and the profile), then the last lines."""
    lowest: dict[str, tuple[float, str]] = {}
    for r in results:
        if "sweep" not in r:
            continue
        case = Case(**r["case"])
        print_sweep(case, r["sweep"])
        for load, point in r["sweep"].items():
            for key in ("adaptive_over_best", "adaptive_over_best_on_group", "adaptive_over_best_whole_run"):
                if key not in lowest or point[key] < lowest[key][0]:
                    lowest[key] = (point[key], f"{case.name}, {load} client(s)")
    if args.summarize:
        path = Path(args.summarize)
        raw = json.loads(path.read_text())
        path.write_text(json.dumps(raw | {"cases": results}, indent=1))
    else:
        path = Path(args.out) / ("parallel-quick.json" if args.quick else "parallel.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in vars(args).items() if k != "out"} | {"took_s": took, "cpus": os.cpu_count()}
        path.write_text(json.dumps({"meta": meta, "cases": results}, indent=1))
    if args.update_profile and not args.quick:
        update_profile(results)
    print(f"\nraw results: {path}; the whole run took {took:.0f} s")
    if lowest:
        group_r, group_at = lowest["adaptive_over_best_on_group"]
        r, at = lowest["adaptive_over_best"]
        whole_r, whole_at = lowest["adaptive_over_best_whole_run"]
        print(f"whole runs (ramp and drain included), adaptive vs best fixed: {whole_r:.3f} (lowest at {whole_at})")
        print(f"adaptive vs the group's best fixed mode (always, never): {group_r:.3f} (lowest at {group_at})")
        print(f"best fixed choice: always, never on the group or the 2 replicas; the lowest at {at}")
        print(f"adaptive vs best fixed: {r:.3f}")


def resummarize(args: argparse.Namespace) -> None:
    """`--summarize FILE`: the tables of a finished run again, from its raw JSON (summaries
    recomputed with this version's rules, and written back)."""
    raw = json.loads(Path(args.summarize).read_text())
    args.quick = raw["meta"].get("quick", False)
    print_degree_header()
    for r in raw["cases"]:
        print_degree_row(Case(**r["case"]), r)
        if "sweep_runs" in r:
            r["sweep"] = summarize(r["sweep_runs"], args.max_others)
    print_summary(raw["cases"], args, raw["meta"].get("took_s", 0.0))


if __name__ == "__main__":
    main()
