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


async def run(args: argparse.Namespace, trace: list[TraceRequest], log_dir: Path) -> fidelity.Comparison:
    """Start the mesh, compare, stop it."""
    workflows = list(dict.fromkeys(fidelity.workflow_of(r) for r in trace))
    mesh = await asyncio.to_thread(fidelity.start_mesh, workflows, log_dir)
    try:
        load = fidelity.Load(args.size, args.steps)
        return await fidelity.compare(mesh, trace, load, args.cores, args.slo_factor, args.solo_runs, args.repeats)
    finally:
        await asyncio.to_thread(mesh.stop)


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
    lines = [f"compute under load / solo: {', '.join(parts)}", "cores busy during each replay:"]
    for run in runs:
        lines.append("  " + ", ".join(f"{name} {cores:.2f}" for name, cores in run.cpu.items()))
    return "\n".join(lines)


def report(c: fidelity.Comparison, workflows: list[str], slo_factor: float) -> str:
    """The profile, the SLOs, the table and the diagnostics (everything but the last line)."""
    m = c.measured
    sim_solo = {w: fidelity.replay_simulated(c.sim, [TraceRequest(0.0, w, workflow=w)])[0].latency_s for w in workflows}
    lines = ["measured profile (s, medians of the solo rounds; per model: its compute):"]
    for w in workflows:
        lines.append(
            f"  {w:<9} solo {m.solo_s[w]:.3f} (spread {m.solo_spread_s[w]:.3f}; simulated {sim_solo[w]:.3f}): "
            + ", ".join(f"{model} {s:.3f}" for model, s in m.step_s[w].items())
        )
    lines.append(f"  hop a step (the rest of the solo latency) {c.sim.hop_s * 1000:.1f} ms")
    lines.append(f"\nSLO = {slo_factor:g}x solo latency: " + ", ".join(f"{w} {s:.2f} s" for w, s in c.slo_s.items()))
    per_run = c.real_attainments
    spread = f" (spread {(max(per_run) - min(per_run)) * 100:.0f} points)" if len(per_run) > 1 else ""
    lines.append(f"real replays: {len(per_run)}, attainment each: {', '.join(pct(a) for a in per_run)}{spread}")
    pooled = fidelity.score([o for run in c.runs for o in run.outcomes], c.slo_s)
    lines.append(table(pooled, fidelity.score(c.simulated, c.slo_s)))
    lines.append(inflation(m, c.runs, workflows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> fidelity.Comparison:
    args = parse_args(argv)
    trace = load_trace(args)
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
        c = asyncio.run(run(args, trace, Path(tmp) / "logs"))
    print(report(c, workflows, args.slo_factor))
    result = {
        "args": vars(args),
        "trace": [json.loads(r.to_json()) for r in trace],
        "measured": c.measured.to_json(),
        "hop_s": c.sim.hop_s,
        "slo_s": c.slo_s,
        "real": [
            {"outcomes": [asdict(o) for o in run.outcomes], "compute_s": run.compute_s, "cpu": run.cpu}
            for run in c.runs
        ],
        "simulated": [asdict(o) for o in c.simulated],
        "attainment": {"real_runs": c.real_attainments, "real": c.real, "simulated": c.simulated_attainment},
        "wall_s": time.time() - t0,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replay.json").write_text(json.dumps(result, indent=1))
    print(
        f"replay: real {c.real:.0%}, simulated {c.simulated_attainment:.0%}, "
        f"difference {c.difference_points:.0f} points"
    )
    return c


if __name__ == "__main__":
    main()
