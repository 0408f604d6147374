"""A short trace through the real mesh and through the simulator with this machine's measured
profile: SLO attainment side by side (bench/fidelity.py says how each side runs).

The trace is a JSONL file in bench/traces/record.py's format (`--trace`), or a seeded one made
here: Poisson arrivals at `--rate` req/s for `--duration` s, with a burst of `--burst-factor` x
for `--burst-s` s from `--burst-at` s, workflows sd3 / flux / sd3-lora (fidelity.MIX). The
defaults put it near the knee of this 2-core box's attainment curve. `--repeats` trials on one
mesh, each: the profile measured (solo rounds), the trace replayed, the trace simulated with
that profile; the SLO of a workflow is `--slo-factor` x its solo latency of that trial.

Prints each trial's profile, attainments (also simulated with a core for each replica, never
shared: an upper bound), the overhead a request measured in the solo rounds and the slowdown
it gives two steps computing together, the models' compute in the replay against solo and
the cores busy by process ("others": the
rest of the machine, which the simulation knows nothing of); then a table over all trials per
workflow and in total (requests, attainment real vs simulated, mean / p90 latency real vs
simulated), and last: `replay: real A%, simulated B%, difference D points` (the trials' means).
Writes replay.json to --out.

    python bench/replay.py [--trace FILE] [--rate 3] [--duration 20] [--repeats 3] [--cores 2]
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
    parser.add_argument("--rate", type=float, default=3.0, help="req/s of the seeded trace")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of the seeded trace")
    parser.add_argument("--burst-at", type=float, default=5.0, help="the burst's start (s)")
    parser.add_argument("--burst-s", type=float, default=3.0, help="the burst's length (s); 0: no burst")
    parser.add_argument("--burst-factor", type=float, default=3.0, help="the rate during the burst, x --rate")
    parser.add_argument("--size", type=int, default=fidelity.Load.size, help="image side (pixels)")
    parser.add_argument("--steps", type=int, default=fidelity.Load.steps, help="denoising steps")
    parser.add_argument("--slo-factor", type=float, default=5.0, help="SLO = this x the workflow's solo latency")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="the simulated GPUs: this box's cores")
    parser.add_argument("--solo-runs", type=int, default=5, help="solo rounds a trial (after a warm-up)")
    parser.add_argument("--repeats", type=int, default=1, help="trials (profile, replay, simulation) on one mesh")
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


def inflation(trial: fidelity.Trial) -> str:
    """What the replay did to the models' compute (mean step in the replay / solo), and the
    cores busy meanwhile, by process ("others": the rest of the machine)."""
    solo: dict[str, list[float]] = {}
    for by_model in trial.measured.step_s.values():
        for m, s in by_model.items():
            solo.setdefault(m, []).append(s)
    parts = [
        f"{m} {statistics.mean(trial.run.compute_s[m]) / statistics.mean(values):.2f}x"
        for m, values in sorted(solo.items())
        if trial.run.compute_s.get(m)
    ]
    cpu = ", ".join(f"{name} {cores:.2f}" for name, cores in trial.run.cpu.items())
    return f"    compute in the replay / solo: {', '.join(parts)}\n    cores busy in the replay: {cpu}"


def report(c: fidelity.Comparison, workflows: list[str], slo_factor: float) -> str:
    """Each trial's profile and attainments, the pooled table (everything but the last line)."""
    lines = [f"SLO = {slo_factor:g}x the workflow's solo latency (measured in each trial)"]
    for i, t in enumerate(c.trials, 1):
        m = t.measured
        sim_solo = {
            w: fidelity.replay_simulated(t.sim, [TraceRequest(0.0, w, workflow=w)])[0].latency_s for w in workflows
        }
        unshared = pct(fidelity.attainment(t.unshared, t.slo_s))
        lines.append(
            f"trial {i}: real {pct(t.real)}, simulated {pct(t.simulated_attainment)} (a core each, unshared: "
            f"{unshared}); profile (s, medians of "
            f"{m.solo_runs} solo rounds; per model its compute), hop a step {t.sim.hop_s * 1000:.1f} ms:"
        )
        for w in workflows:
            lines.append(
                f"    {w:<9} solo {m.solo_s[w]:.3f} (spread {m.solo_spread_s[w]:.3f}; simulated {sim_solo[w]:.3f}): "
                + ", ".join(f"{model} {s:.3f}" for model, s in m.step_s[w].items())
            )
        lines.append(
            f"    overhead {m.overhead_cpu_s * 1000:.0f} CPU-ms a request (outside the models' compute): two steps "
            f"computing at once run {t.sim.contention:.2f}x slower at the trace's mean rate"
        )
        lines.append(inflation(t))
    reals = [t.real for t in c.trials]
    if len(reals) > 1:
        sims = [t.simulated_attainment for t in c.trials]
        lines.append(
            f"spread over {len(reals)} trials: real {(max(reals) - min(reals)) * 100:.0f} points, "
            f"simulated {(max(sims) - min(sims)) * 100:.0f} points"
        )
    lines.append("\nall trials pooled:")
    real_rows = fidelity.score([(t.run.outcomes, t.slo_s) for t in c.trials])
    sim_rows = fidelity.score([(t.simulated, t.slo_s) for t in c.trials])
    lines.append(table(real_rows, sim_rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> fidelity.Comparison:
    args = parse_args(argv)
    trace = load_trace(args)
    if not trace:
        sys.exit("replay: the trace is empty")
    try:
        fidelity.check_replayable(trace)
    except ValueError as exc:
        sys.exit(f"replay: {exc}")
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
        "trials": [
            {
                "measured": t.measured.to_json(),
                "hop_s": t.sim.hop_s,
                "slo_s": t.slo_s,
                "real": {
                    "outcomes": [asdict(o) for o in t.run.outcomes],
                    "compute_s": t.run.compute_s,
                    "cpu": t.run.cpu,
                },
                "simulated": [asdict(o) for o in t.simulated],
                "attainment": {"real": t.real, "simulated": t.simulated_attainment},
            }
            for t in c.trials
        ],
        "attainment": {"real": c.real, "simulated": c.simulated_attainment},
        "wall_s": time.time() - t0,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replay.json").write_text(json.dumps(result, indent=1))
    if c.busy_elsewhere > fidelity.BUSY_ELSEWHERE_MAX:
        print(
            f"WARNING: other work on this machine kept up to {c.busy_elsewhere:.2f} cores busy during a replay; "
            "the simulation knows nothing of it (compare on a machine of your own)"
        )
    print(
        f"replay: real {c.real:.0%}, simulated {c.simulated_attainment:.0%}, "
        f"difference {c.difference_points:.0f} points"
    )
    return c


if __name__ == "__main__":
    main()
