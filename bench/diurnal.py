"""A production-shaped day on a simulated cluster: SLO attainment and GPUs in use, hour by hour.

Why: a rate sweep (`bench/simulate.py --cluster`) holds each rate steady; production's rate
follows the day (3x from trough to peak), with flash crowds and a mix that drifts hour to hour
(`bench/traces/generate.py`). This replays one such day, compressed into `--day-s` seconds (a
trace hour is `day-s / 24`), through the three systems of `bench/cluster.py`, each scaled by the
autoscaler's own policy, and prints per trace hour the arrival rate, each system's attainment
(SLO `--slo` x each request's solo latency) and the GPUs holding one of its replicas (a GPU
holding none could be given back). Each system sits behind the gateway's overload rule, as
`lego up` does: a request whose models' queues already outlast its deadline is refused at once
(429), its client having asked for its SLO as its timeout; a refused request counts as missed.
Without it (`--no-refuse`) a flash crowd leaves a queue that takes hours to drain at the
day's peak, and every request behind it misses. The last line sums the day:
`day: <system> attainment A, GPU-hours G; ...`.

Plots: `docs/cluster-diurnal-<G>-gpus.png` (GPUs in use over the day) and
`docs/cluster-diurnal-<G>-attainment.png` (attainment per trace hour), or under `--plots`.

    python bench/diurnal.py --gpus 64 --load 0.6 [--day-s 7200] [--systems mesh,strong,research] [--warm-fill 0.8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cluster import PROFILE, build, compute_bound, load_profile, solo_s  # noqa: E402
from bench.plots import attainment_plot, line_plot  # noqa: E402
from bench.traces.generate import TraceParams, generate  # noqa: E402
from bench.traces.record import TraceRequest  # noqa: E402

SAMPLES_AN_HOUR = 6  # GPUs in use are sampled this often a trace hour


def day_trace(p: dict[str, Any], gpus: int, load: float, day_s: float, seed: int) -> tuple[list[TraceRequest], float]:
    """A day of the generator's default shape whose mean rate is `load` x the compute bound
    (bursts come on top), and that bound in req/s."""
    reference = list(generate(TraceParams(hours=1.0, mean_rate=10.0), seed))
    bound = compute_bound(p, reference, gpus)
    params = TraceParams(hours=24.0, mean_rate=load * bound, day_s=day_s)
    return list(generate(params, seed)), bound


def run_day(
    p: dict[str, Any],
    system: str,
    gpus: int,
    trace: list[TraceRequest],
    day_s: float,
    slo: float,
    refuse: bool = True,
    warm_fill: float = 0.0,
) -> dict[str, Any]:
    """One system through the day: per trace hour its attainment, mean GPUs in use, requests."""
    hour_s = day_s / 24
    began = time.monotonic()
    sim = build(system, p, gpus, trace)
    if warm_fill:
        sim.policy = replace(sim.policy, warm_fill=warm_fill)
    sim.sample_s = hour_s / SAMPLES_AN_HOUR
    if refuse:
        sim.deadline_s = lambda i: slo * solo_s(p, trace[i])
    outcomes = sim.run(trace, until=day_s + 600.0)
    met, seen = [0] * 24, [0] * 24
    for o in outcomes:
        hour = min(int(o.arrived // hour_s), 23)
        seen[hour] += 1
        met[hour] += o.latency_s is not None and o.latency_s <= slo * solo_s(p, trace[o.index])
    used: list[list[int]] = [[] for _ in range(24)]
    for t, gpus_used, _ in sim.samples:
        if t < day_s:
            used[min(int(t // hour_s), 23)].append(gpus_used)
    return {
        "attainment": [m / n if n else None for m, n in zip(met, seen, strict=True)],
        "requests": seen,
        "gpus_used": [sum(u) / len(u) if u else 0.0 for u in used],
        "samples": [(t, g) for t, g, _ in sim.samples],
        "day_attainment": sum(met) / max(sum(seen), 1),
        "gpu_hours": sum(g for t, g, _ in sim.samples if t < day_s) / SAMPLES_AN_HOUR,
        "starts": sim.starts,
        "refused": sim.refused,
        "wall_s": time.monotonic() - began,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Example: --gpus 64 --load 0.6")
    parser.add_argument("--gpus", type=int, default=64, help="GPUs in the cluster (8 a node; default 64)")
    parser.add_argument("--load", type=float, default=0.6, help="the day's mean rate, of the compute bound (0.6)")
    parser.add_argument("--day-s", type=float, default=7200.0, help="seconds a simulated day lasts (default 7200)")
    parser.add_argument("--slo", type=float, default=5.0, help="SLO, x each request's solo latency (default 5)")
    parser.add_argument("--systems", default="mesh,strong,research", help="which systems (bench/cluster.py)")
    parser.add_argument(
        "--no-refuse",
        action="store_true",
        help="queue every request (default: refuse at arrival what the gateway's overload rule refuses, "
        "with each request's SLO as its timeout)",
    )
    parser.add_argument(
        "--warm-fill", type=float, default=0.0, help="the autoscaler's warm pool (LEGO_AUTOSCALE_WARM_FILL; 0: off)"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--profile", default=str(PROFILE), help="figures with their sources")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where diurnal-<G>.json goes")
    parser.add_argument("--plots", default=str(ROOT / "docs"), help="where the two plots go")
    args = parser.parse_args(argv)
    if args.gpus < 1 or args.load <= 0 or args.day_s < 240 or args.slo <= 1 or not 0 <= args.warm_fill <= 1:
        parser.error("need --gpus >= 1, --load > 0, --day-s >= 240, --slo > 1 and --warm-fill in [0, 1]")
    p = load_profile(args.profile)
    trace, bound = day_trace(p, args.gpus, args.load, args.day_s, args.seed)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    print(
        f"{args.gpus} GPUs, compute bound {bound:.2f} req/s; a day of {len(trace)} requests in {args.day_s:g} s, "
        f"mean {args.load:g} x the bound (bursts on top), SLO {args.slo:g}x"
    )
    results = {}
    for system in systems:
        results[system] = run_day(p, system, args.gpus, trace, args.day_s, args.slo, not args.no_refuse, args.warm_fill)
        r = results[system]
        print(f"  {system}: simulated in {r['wall_s']:.0f} s, {r['starts']} cold starts, {r['refused']} refused")
    hour_s = args.day_s / 24
    print("\n| hour | req/s | " + " | ".join(f"{s} attainment | {s} GPUs" for s in systems) + " |")
    print("|---" * (2 + 2 * len(systems)) + "|")
    for h in range(24):
        rate = results[systems[0]]["requests"][h] / hour_s
        cells = []
        for s in systems:
            att = results[s]["attainment"][h]
            cells += ["-" if att is None else f"{att:.1%}", f"{results[s]['gpus_used'][h]:.1f}"]
        print(f"| {h:02d} | {rate:.2f} | " + " | ".join(cells) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"diurnal-{args.gpus}.json").write_text(
        json.dumps({"args": vars(args), "bound": bound, "requests": len(trace), "results": results}, indent=1)
    )
    plots = Path(args.plots)
    rate_line = [
        (h + 0.5, min(results[systems[0]]["requests"][h] / hour_s / bound, 1.0) * args.gpus) for h in range(24)
    ]
    line_plot(
        {
            **{s: [(t / hour_s, g) for t, g in results[s]["samples"] if t < args.day_s] for s in systems},
            "req/s": rate_line,
        },
        f"GPUs holding a replica over the day ({args.gpus} GPUs; grey: arrivals, as GPUs of compute)",
        "trace hour",
        plots / f"cluster-diurnal-{args.gpus}-gpus.png",
        top=float(args.gpus),
        ticks=tuple(float(args.gpus) * f for f in (0.25, 0.5, 0.75, 1.0)),
        xticks=tuple(float(h) for h in range(0, 25, 3)),
    )
    attainment_plot(
        {s: [(h + 0.5, a) for h, a in enumerate(results[s]["attainment"]) if a is not None] for s in systems},
        f"SLO {args.slo:g}x attainment per trace hour ({args.gpus} GPUs)",
        "trace hour",
        plots / f"cluster-diurnal-{args.gpus}-attainment.png",
    )
    print(
        "\nday: "
        + "; ".join(
            f"{s} attainment {results[s]['day_attainment']:.1%}, GPU-hours {results[s]['gpu_hours']:.0f}"
            for s in systems
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
