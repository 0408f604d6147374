"""A short trace through the real mesh and through the simulator with this machine's measured
profile: SLO attainment side by side (bench/fidelity.py says how each side runs).

The trace is a JSONL file in bench/traces/record.py's format (`--trace`), or a seeded one made
here: Poisson arrivals at `--rate` req/s for `--duration` s, with a burst of `--burst-factor` x
for `--burst-s` s from `--burst-at` s, workflows sd3 / flux / sd3-lora (fidelity.MIX). The SLO
of a workflow is `--slo-factor` x its solo latency measured on the real mesh. The real replay
runs `--repeats` times on the same mesh (the simulation is deterministic); its attainment is
their mean, their spread is printed.

Prints the measured profile, a table per workflow and in total (requests, attainment real vs
simulated, mean / p90 latency real vs simulated), and last:
`replay: real A%, simulated B%, difference D points`. Writes replay.json to --out.

    python bench/replay.py [--trace FILE] [--rate 1.5] [--duration 20] [--repeats 3] [--cores 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import fidelity  # noqa: E402
from bench.traces.record import TraceRequest, read_jsonl  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", help="a JSONL trace (bench/traces/record.py); default: a seeded short one")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--rate", type=float, default=1.5, help="req/s of the seeded trace")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of the seeded trace")
    parser.add_argument("--burst-at", type=float, default=5.0, help="the burst's start (s)")
    parser.add_argument("--burst-s", type=float, default=3.0, help="the burst's length (s); 0: no burst")
    parser.add_argument("--burst-factor", type=float, default=3.0, help="the rate during the burst, x --rate")
    parser.add_argument("--size", type=int, default=fidelity.Load.size, help="image side (pixels)")
    parser.add_argument("--steps", type=int, default=fidelity.Load.steps, help="denoising steps")
    parser.add_argument("--slo-factor", type=float, default=5.0, help="SLO = this x the workflow's solo latency")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="the simulated GPUs: this box's cores")
    parser.add_argument("--solo-runs", type=int, default=5, help="solo requests a workflow (after 2 warm-ups)")
    parser.add_argument("--repeats", type=int, default=1, help="real replays of the trace on the same mesh")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "replay"))
    return parser.parse_args(argv)


def load_trace(args: argparse.Namespace) -> list[TraceRequest]:
    if args.trace:
        return list(read_jsonl(args.trace))
    burst = (args.burst_at, args.burst_s, args.burst_factor) if args.burst_s > 0 else None
    return fidelity.short_trace(args.seed, args.duration, args.rate, burst)


async def run_real(
    args: argparse.Namespace, trace: list[TraceRequest], load: fidelity.Load, log_dir: Path
) -> tuple[fidelity.Measured, list[fidelity.RealRun]]:
    """Start the mesh, measure the profile, replay `--repeats` times (the queues drained between:
    every request of a replay is answered before the next starts), stop it."""
    workflows = list(dict.fromkeys(fidelity.workflow_of(r) for r in trace))
    mesh = await asyncio.to_thread(fidelity.start_mesh, workflows, log_dir)
    try:
        measured = await fidelity.measure(mesh, trace, load, args.solo_runs)
        runs = [await fidelity.replay_real(mesh, trace, load) for _ in range(args.repeats)]
    finally:
        await asyncio.to_thread(mesh.stop)
    return measured, runs


def pct(x: float) -> str:
    return f"{x:.0%}"


def table(real: list[fidelity.Row], sim: list[fidelity.Row]) -> str:
    head = f"{'workflow':<10}{'requests':>9}{'attain real':>13}{'sim':>6}{'mean s real':>13}{'sim':>7}"
    head += f"{'p90 s real':>12}{'sim':>7}"
    lines = [head]
    for r, s in zip(real, sim, strict=True):
        lines.append(
            f"{r.name:<10}{r.requests:>9}{pct(r.attainment):>13}{pct(s.attainment):>6}"
            f"{r.mean_s:>13.2f}{s.mean_s:>7.2f}{r.p90_s:>12.2f}{s.p90_s:>7.2f}"
        )
    return "\n".join(lines)


def inflation(measured: fidelity.Measured, runs: list[fidelity.RealRun], workflows: list[str]) -> str:
    """What the replay did to the models' compute (mean step in the replays / solo), and the
    cores busy meanwhile: ours (the mesh and this driver) and the rest of the machine's."""
    solo: dict[str, list[float]] = {}
    for w in workflows:
        for m, s in measured.step_s[w].items():
            solo.setdefault(m, []).append(s)
    parts = []
    for m, values in sorted(solo.items()):
        under_load = [s for run in runs for s in run.compute_s.get(m, [])]
        if under_load:
            parts.append(f"{m} {statistics.mean(under_load) / statistics.mean(values):.2f}x")
    cpu = "; ".join(f"mesh {run.cpu['mesh']:.2f}, others {run.cpu['others']:.2f}" for run in runs)
    return f"compute under load / solo: {', '.join(parts)}\ncores busy during each replay: {cpu}"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    trace = load_trace(args)
    load = fidelity.Load(args.size, args.steps)
    workflows = list(dict.fromkeys(fidelity.workflow_of(r) for r in trace))
    span = max(r.timestamp for r in trace)
    print(
        f"trace: {len(trace)} requests over {span:.1f} s ({len(trace) / max(span, 1e-9):.2f} req/s), "
        f"workflows {workflows}; {args.size}x{args.size}, {args.steps} steps; "
        f"{os.cpu_count()} cores here, simulated as {args.cores} GPUs",
        flush=True,
    )
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="lego-replay-") as tmp:
        measured, runs = asyncio.run(run_real(args, trace, load, Path(tmp) / "logs"))
    sim = fidelity.simulation(measured, workflows, args.cores)
    sim_solo = {w: fidelity.replay_simulated(sim, [TraceRequest(0.0, w, workflow=w)])[0].latency_s for w in workflows}
    print(
        "measured profile (s): "
        + "; ".join(
            f"{w} solo {measured.solo_s[w]:.3f} (spread {measured.solo_spread_s[w]:.3f}, simulated {sim_solo[w]:.3f}): "
            + ", ".join(f"{m} {s:.3f}" for m, s in measured.step_s[w].items())
            for w in workflows
        )
        + f"; hop a stage {sim.hop_s:.3f}"
    )
    simulated = fidelity.replay_simulated(sim, trace)

    slo = fidelity.slo_of(measured, args.slo_factor)
    sim_rows = fidelity.score(simulated, slo)
    real_rows = [fidelity.score(run.outcomes, slo) for run in runs]
    pooled = fidelity.score([o for run in runs for o in run.outcomes], slo)
    per_run = [rows[-1].attainment for rows in real_rows]
    print(f"\nSLO = {args.slo_factor:g}x solo latency: " + ", ".join(f"{w} {s:.2f} s" for w, s in slo.items()))
    print(
        f"real replays: {len(runs)}, total attainment each: {', '.join(pct(a) for a in per_run)}"
        + (f" (spread {max(per_run) - min(per_run):.0%})" if len(runs) > 1 else "")
    )
    print(table(pooled, sim_rows))
    print(inflation(measured, runs, workflows))
    real_a, sim_a = statistics.mean(per_run), sim_rows[-1].attainment

    result = {
        "args": vars(args),
        "trace": [json.loads(r.to_json()) for r in trace],
        "measured": measured.to_json(),
        "hop_s": sim.hop_s,
        "slo_s": slo,
        "real": [
            {"outcomes": [asdict(o) for o in run.outcomes], "compute_s": run.compute_s, "cpu": run.cpu} for run in runs
        ],
        "simulated": [asdict(o) for o in simulated],
        "attainment": {"real_runs": per_run, "real": real_a, "simulated": sim_a},
        "wall_s": time.time() - t0,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replay.json").write_text(json.dumps(result, indent=1))
    print(f"replay: real {real_a:.0%}, simulated {sim_a:.0%}, difference {abs(real_a - sim_a) * 100:.0f} points")
    return result


if __name__ == "__main__":
    main()
