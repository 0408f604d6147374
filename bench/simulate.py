"""Micro-served vs monolithic serving on a simulated GPU cluster, scaled by the real policy.

The 2-core dev box cannot show what the design is for (bench/burst.py says why), so this
replays the same kind of trace on a simulated cluster (services/autoscaler/simulator.py): G
GPUs of 80 GiB, each computing one step at a time; replicas placed by memory; the autoscaler's
own ScalePolicy deciding replicas every second for both systems (SLO 5x, utilisation 0.7,
cooldown 30 s, 1 to 16 replicas a unit). Micro-served: a unit per model kind (encoder with
CLIP-L, CLIP-G and T5; VAEs; one denoiser per base model, its LoRA workflows served by the
same replicas), plus a fixed hop per stage. Monolithic: a unit per workflow, each replica the
whole pipeline (its encoders one after the other, as in-process), no hops.

Profiles (`--profile FILE` overrides any of the figures below, per model: e.g. step times that
bench/gpu/run.sh measured for SD3's stages, {"step_s": {"sd3-transformer": 1.4}}): memory is
the full-size bf16 parameter bytes (bench/memory.py) plus 2 GiB a process; step times for
1024x1024, 28 steps on an H100 are ASSUMED by default. SD3-Medium's stages were measured on one
H100: `--profile bench/profiles/h100-sd3.json`. Load time = 5 s + bytes at 2 GB/s.

Capacity: the highest Poisson rate at which >= 90% of requests meet the SLO (5x the
monolithic pipeline's solo latency of their workflow, for both systems). Burst tolerance: the
largest burst (k x a base rate for 30 s) after which >= 90% of the burst's and the next 60 s's
requests meet it. The last two lines are the capacity and burst ratios micro/monolithic.
Writes simulate.json and two plots (simulate-rates.png, simulate-bursts.png) to --out.

Parallel groups (issue 14): with `--group-size K` (2 or 4) each micro-served denoiser replica
owns K GPUs (its weights on each; GPUs / K replicas of each base model kept warm) and splits
each request over d of them as `--parallel-mode` says (adaptive: the denoiser's own rule,
shared/parallel_policy.py, with the request's SLO slack; never; always). A step at degree d
takes the base model's step time x the ratio in `--parallel-profile` (bench/profiles/
parallel.json: Flux published by xDiT, SD3's CFG split measured on one H200 (projected), the
other CFG splits assumed). The monolith is not split. The
table then counts the micro-served denoiser steps run at each degree.

Production-shaped clusters (issue 15): `--cluster 8,64,1000` runs instead the mesh and two
baselines whose rules bench/cluster.py's docstring fixes (the research system's baseline: a
monolithic pipeline per workflow and ControlNet/LoRA combination; the strong monolith: a
pipeline per base model swapping ControlNets and LoRAs in process), from the figures of
bench/profiles/cluster.json (each with its source), on a built trace (>98% ControlNet, >95%
LoRA, 150 ControlNets, 14,500 LoRAs) or a recorded one (`--trace FILE`, JSONL of
bench/traces/record.py, replayed at each rate with its timestamps scaled). Rates are fractions
of the cluster's compute bound (`--fractions`); bursts are 30 s at k x 0.1 of the bound. Each
run: 120 s served unscored, then `--cluster-phase-s` scored. It prints per size and SLO (3x, 5x,
10x each request's solo latency) the max rate at >= 90% attainment and the largest burst, and
last `research baseline: rate Rx burst Bx; strong monolith: rate Sx; compute bound: F` (SLO 5x,
the largest size); `--controlnet-link nvlink|pcie|network` puts the mesh's ControlNets on other
devices. `--warm-fills 0,0.8` runs the mesh and the strong monolith with and without the
autoscaler's warm pool and takes each cell's best: every system at its best setting per test
(bursts want the pool; steady rates near the bound on 1,000 GPUs do not). Writes cluster.json
to --out.

    python bench/simulate.py [--gpus 4] [--rates 0.2 0.4 ...] [--bursts 2 4 8 16] [--profile FILE]
                             [--group-size 2] [--parallel-mode adaptive|never|always] [--parallel-profile FILE]
    python bench/simulate.py --cluster 8,64,1000 [--trace FILE] [--slo-factors 3,5,10] [--systems mesh,strong]
                             [--warm-fills 0,0.8]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cluster import Groups, TableConfig, load_profile, load_ratios, stages_of, summary_lines, table  # noqa: E402
from bench.plots import attainment_plot  # noqa: E402
from bench.traces.record import read_jsonl  # noqa: E402
from services.autoscaler.policy import MODES, Limits, PolicyConfig, Slo  # noqa: E402
from services.autoscaler.simulator import ModelProfile, Simulation, attainment  # noqa: E402
from shared.zoo.full_size import PARAM_GIB  # noqa: E402

GIB = 2**30
ASSUMED_H100 = {
    "source": "assumed H100 figures (not measured): 1024x1024, 28 steps, bf16; memory from full-size configs",
    "step_s": {
        "clip-l": 0.004,
        "clip-g": 0.010,
        "t5": 0.030,
        "sd3-transformer": 1.6,
        "sd35-large-transformer": 5.2,
        "flux-transformer": 5.6,
        "sd3-vae": 0.12,
        "flux-vae": 0.12,
    },
    "memory_gib": dict(PARAM_GIB),
    "process_gib": 2.0,
    "load_gbps": 2.0,
    "start_s": 5.0,
    "hop_s": 0.01,
}
# The trace's workflows and popularity: skewed, as in bench/burst.py, plus each family's LoRA.
MIX = {"sd3": 0.35, "sd3-lora": 0.15, "flux": 0.25, "flux-lora": 0.05, "sd35-large": 0.15, "sd35-large-lora": 0.05}
UNITS = {
    "encoder": ["clip-l", "clip-g", "t5"],
    "vae": ["sd3-vae", "flux-vae"],
    "sd3-transformer": ["sd3-transformer"],
    "sd35-large-transformer": ["sd35-large-transformer"],
    "flux-transformer": ["flux-transformer"],
}
DENOISERS = [u for u in UNITS if u.endswith("-transformer")]
PARALLEL_PROFILE = ROOT / "bench" / "profiles" / "parallel.json"
CLUSTER_PROFILE = ROOT / "bench" / "profiles" / "cluster.json"


def with_overrides(base: dict, given: dict) -> dict:
    """`given` over `base`, per model inside "step_s" and "memory_gib": a profile measured for a
    few models (e.g. SD3's stages by bench/gpu/run.sh) keeps the assumed figures of the rest."""
    out = {**base, **{k: v for k, v in given.items() if k not in ("step_s", "memory_gib")}}
    for key in ("step_s", "memory_gib"):
        out[key] = {**base[key], **given.get(key, {})}
    out["source"] = given.get("source", "measured figures over " + base["source"])
    return out


def _profile(models: list[str], p: dict, step_s: float | None = None) -> ModelProfile:
    memory = (sum(p["memory_gib"][m] for m in models) + p["process_gib"]) * GIB
    step = step_s if step_s is not None else max(p["step_s"][m] for m in models)
    return ModelProfile(step_s=step, memory_bytes=int(memory), load_s=p["start_s"] + memory / (p["load_gbps"] * 1e9))


def micro(
    p: dict, policy: PolicyConfig, gpus: int, groups: Groups | None = None, slo_s: dict[str, float] | None = None
) -> Simulation:
    # The simulator adds up the memory of a unit's models for one replica, and loads a replica
    # in its slowest model's load time: the process overhead goes on the unit's first model,
    # and every model gets its whole unit's load time.
    groups = groups or Groups()
    split = groups.size > 1
    models = {}
    for unit_models in UNITS.values():
        load_s = _profile(unit_models, p).load_s
        for i, m in enumerate(unit_models):
            memory = (p["memory_gib"][m] + (p["process_gib"] if i == 0 else 0.0)) * GIB
            degree_s = {d: p["step_s"][m] * r for d, r in groups.ratios.get(m, {}).items() if d > 1} if split else {}
            models[m] = ModelProfile(step_s=p["step_s"][m], memory_bytes=int(memory), load_s=load_s, degree_s=degree_s)
    return Simulation(
        workflows={w: stages_of(w) for w in MIX},
        models=models,
        units=UNITS,
        policy=policy,
        hop_s=p["hop_s"],
        gpus=gpus,
        group_size={u: groups.size for u in DENOISERS} if split else {},
        parallel_mode=groups.mode,
        slo_s=dict(slo_s or {}) if split else {},
    )


def monolithic_solo_s(workflow: str, p: dict) -> float:
    """In-process: every model one after the other."""
    return sum(p["step_s"][m] for stage in stages_of(workflow) for m in stage)


def monolithic(p: dict, policy: PolicyConfig, gpus: int) -> Simulation:
    models, units, workflows = {}, {}, {}
    for w in MIX:
        used = sorted({m for stage in stages_of(w) for m in stage})
        models[w] = _profile(used, p, step_s=monolithic_solo_s(w, p))
        units[w] = [w]
        workflows[w] = [[w]]
    return Simulation(workflows=workflows, models=models, units=units, policy=policy, gpus=gpus)


def poisson(rate: float, start: float, end: float, rng: random.Random) -> list[tuple[float, str]]:
    names, weights = list(MIX), list(MIX.values())
    out, t = [], start
    while True:
        t += rng.expovariate(rate)
        if t >= end:
            return out
        out.append((t, rng.choices(names, weights)[0]))


def run_both(
    p: dict,
    gpus: int,
    arrivals: list[tuple[float, str]],
    until: float,
    window: tuple[float, float],
    warm_all: bool,
    groups: Groups | None = None,
):
    def policy(min_of: dict[str, int]) -> PolicyConfig:
        return PolicyConfig(
            slo=Slo(factor=5.0),
            cooldown_s=30.0,
            memory_budget_bytes=gpus * 80 * GIB,
            default_limits=Limits(1, 16),
            limits={unit: Limits(n, max(n, 16)) for unit, n in min_of.items()},
        )

    # Each system keeps warm what its memory allows: the mesh a replica of every base model on
    # every GPU (all three together take 47 GiB of a GPU's 80; a group's replica is on K GPUs,
    # so GPUs / K of them), the monolith one replica of every workflow (one of each takes
    # 166 GiB: a second of each would not fit in 4 x 80).
    groups = groups or Groups()
    warm = max(1, gpus // groups.size)
    mins = {"micro": {u: warm for u in DENOISERS} if warm_all else {}, "monolithic": {}}
    slo = {w: 5.0 * monolithic_solo_s(w, p) for w in MIX}
    sims = {
        "micro": micro(p, policy(mins["micro"]), gpus, groups, slo),
        "monolithic": monolithic(p, policy(mins["monolithic"]), gpus),
    }
    out = {}
    for name, sim in sims.items():
        outcomes = [o for o in sim.run(arrivals, until) if window[0] <= o.arrived < window[1]]
        out[name] = {"attainment": attainment(outcomes, slo), "requests": len(outcomes), "starts": sim.starts}
        if groups.size > 1 and name == "micro":
            out[name]["degrees"] = {str(d): n for d, n in sorted(sim.degrees.items())}
            out[name]["rescues"] = sim.degree_reasons["deadline rescue"]
    return out


def degree_cell(res: dict, groups: Groups) -> str:
    """The micro-served denoiser steps at each degree the groups can take, e.g. '412/88'."""
    if groups.size == 1:
        return ""
    counts = res["micro"]["degrees"]
    return "   " + "/".join(str(counts.get(str(d), 0)) for d in (1, 2, 4) if d <= groups.size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument(
        "--rates", type=float, nargs="+", default=[round(0.1 * i, 1) for i in range(2, 15)], help="req/s phases"
    )
    parser.add_argument("--burst-base", type=float, default=0.2, help="req/s before and after a burst")
    parser.add_argument("--bursts", type=float, nargs="+", default=[2, 3, 4, 6, 8, 12, 16, 24, 32])
    parser.add_argument("--phase-s", type=float, default=900.0, help="seconds of each Poisson phase")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--no-warm",
        dest="warm",
        action="store_false",
        help="the mesh keeps only one replica of each unit warm (default: every base model on every GPU)",
    )
    parser.add_argument(
        "--profile",
        help='JSON overriding the assumed H100 figures per model, e.g. {"step_s": {"sd3-transformer": 1.4}}',
    )
    parser.add_argument(
        "--group-size", type=int, choices=(1, 2, 4), default=1, help="GPUs a micro-served denoiser replica owns"
    )
    parser.add_argument(
        "--parallel-mode", choices=MODES, default="adaptive", help="how a group picks each request's degree"
    )
    parser.add_argument(
        "--parallel-profile", default=str(PARALLEL_PROFILE), help="per-degree step-time ratios (with --group-size > 1)"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    cluster = parser.add_argument_group("production-shaped cluster table (issue 15; bench/cluster.py)")
    cluster.add_argument("--cluster", help="cluster sizes in GPUs, e.g. 8,64,1000: the mesh and both baselines")
    cluster.add_argument(
        "--trace", help="a JSONL trace (bench/traces/record.py) replayed at each rate (default: built)"
    )
    cluster.add_argument("--cluster-profile", default=str(CLUSTER_PROFILE), help="figures with their sources")
    cluster.add_argument("--fractions", default="0.2,0.35,0.5,0.6,0.7,0.8,0.9,1.0", help="rates, of the compute bound")
    cluster.add_argument(
        "--cluster-bursts", default="1,2,4,8,16,32", help="bursts, x 0.1 of the compute bound, 30 s (1: no burst)"
    )
    cluster.add_argument(
        "--warm-fills",
        default="0",
        help="autoscaler warm pools (LEGO_AUTOSCALE_WARM_FILL) the mesh and the strong monolith run at, e.g. 0,0.8;"
        " each cell takes the best",
    )
    cluster.add_argument("--slo-factors", default="3,5,10", help="SLOs, x each request's solo latency")
    cluster.add_argument("--cluster-phase-s", type=float, default=300.0, help="scored seconds a rate (after 120 s)")
    cluster.add_argument("--controlnet-link", choices=("local", "nvlink", "pcie", "network"), default="local")
    cluster.add_argument("--systems", default="mesh,research,strong", help="which systems to run")
    args = parser.parse_args()
    if args.cluster:
        cluster_table(args)
        return
    p = with_overrides(ASSUMED_H100, json.loads(Path(args.profile).read_text())) if args.profile else ASSUMED_H100
    groups = Groups()
    if args.group_size > 1:
        groups = Groups(args.group_size, args.parallel_mode, load_ratios(args.parallel_profile))
    print(f"{args.gpus} GPUs of 80 GiB; profile: {p['source']}")
    print("solo latency (monolithic, s): " + ", ".join(f"{w} {monolithic_solo_s(w, p):.2f}" for w in MIX))
    if groups.size > 1:
        source = json.loads(Path(args.parallel_profile).read_text()).get("source", args.parallel_profile)
        print(
            f"micro denoisers: groups of {groups.size} GPUs, parallel mode {groups.mode}; degree ratios: "
            + ", ".join(
                f"{m} " + "/".join(f"{r:g}" for _, r in sorted(groups.ratios.get(m, {}).items())) for m in DENOISERS
            )
            + f" ({source})"
        )

    rows = []
    degrees_head = f"   micro steps at degree {'/'.join(str(d) for d in (1, 2, 4) if d <= groups.size)}"
    print(
        f"\n{'phase':>14} {'micro':>7} {'mono':>7}   cold starts micro/mono" + (degrees_head if groups.size > 1 else "")
    )
    for rate in args.rates:
        rng = random.Random(args.seed)
        warm = 120.0
        arrivals = poisson(rate, 0.0, warm + args.phase_s, rng)
        res = run_both(
            p, args.gpus, arrivals, warm + args.phase_s + 600, (warm, warm + args.phase_s), args.warm, groups
        )
        rows.append({"phase": f"{rate:g} req/s", "rate": rate, **res})
        print(
            f"{rate:>9g} req/s {res['micro']['attainment']:>7.0%} {res['monolithic']['attainment']:>7.0%}"
            f"   {res['micro']['starts']}/{res['monolithic']['starts']}" + degree_cell(res, groups)
        )
    for k in args.bursts:
        rng = random.Random(args.seed)
        base, burst_at, burst_s = args.burst_base, 300.0, 30.0
        arrivals = poisson(base, 0.0, burst_at, rng)
        arrivals += poisson(base * k, burst_at, burst_at + burst_s, rng)
        arrivals += poisson(base, burst_at + burst_s, burst_at + burst_s + 300, rng)
        res = run_both(p, args.gpus, arrivals, burst_at + 1800, (burst_at, burst_at + burst_s + 60), args.warm, groups)
        rows.append({"phase": f"burst {k:g}x", "burst": k, **res})
        print(
            f"{f'burst {k:g}x':>14} {res['micro']['attainment']:>7.0%} {res['monolithic']['attainment']:>7.0%}"
            f"   {res['micro']['starts']}/{res['monolithic']['starts']}" + degree_cell(res, groups)
        )

    def best(system: str, key: str) -> float:
        ok = [r[key] for r in rows if key in r and r[system]["attainment"] >= 0.9]
        return max(ok, default=0.0)

    cap = {s: best(s, "rate") for s in ("micro", "monolithic")}
    bur = {s: best(s, "burst") for s in ("micro", "monolithic")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"gpus": args.gpus, "profile": p, "rows": rows, "capacity": cap, "burst": bur}
    if groups.size > 1:
        summary["groups"] = {
            "size": groups.size,
            "mode": groups.mode,
            "profile": args.parallel_profile,
            "ratios": {m: {str(d): r for d, r in ratios.items()} for m, ratios in groups.ratios.items()},
        }
    (out / "simulate.json").write_text(json.dumps(summary, indent=2))
    for key, name, label in (("rate", "rates", "request rate (req/s)"), ("burst", "bursts", "burst (x the base rate)")):
        series = {s: [(r[key], r[s]["attainment"]) for r in rows if key in r] for s in ("micro", "monolithic")}
        title = f"simulated {args.gpus} x 80 GiB GPUs: SLO attainment vs {label.split(' (')[0]} (bench/simulate.py)"
        if groups.size > 1:
            title += f"; micro: groups of {groups.size} ({groups.mode})"
        attainment_plot(series, title, label, out / f"simulate-{name}.png")
    print(f"\nhighest rate at >= 90%: micro {cap['micro']:g} req/s, monolithic {cap['monolithic']:g} req/s")
    print(f"largest burst at >= 90%: micro {bur['micro']:g}x, monolithic {bur['monolithic']:g}x")

    def ratio(a: float, b: float, tried: list[float]) -> str:
        """a / b; when the monolith met none of the values tried, a lower bound against the smallest."""
        if b > 0:
            return f"{a / b:.2f}"
        return f"> {a / min(tried):.2f}" if a else "n/a"

    print(f"capacity ratio micro/monolithic: {ratio(cap['micro'], cap['monolithic'], args.rates)}")
    print(f"burst ratio micro/monolithic: {ratio(bur['micro'], bur['monolithic'], args.bursts)}")


def cluster_plots(results: dict, out: Path, slo: str = "5x") -> None:
    """Per cluster size, attainment at `slo` against the request rate, a line per system
    (cluster-<GPUs>-rates.png)."""
    for gpus, res in results.items():
        rows = [r for r in res["rows"] if "rate" in r]
        systems = [s for s in ("mesh", "research", "strong") if rows and s in rows[0]]
        series = {s: [(round(r["rate"], 1), r[s]["attainment"][slo]) for r in rows] for s in systems}
        title = f"simulated {gpus} GPUs: SLO {slo} attainment vs rate (bench/simulate.py --cluster)"
        attainment_plot(series, title, "request rate (req/s)", out / f"cluster-{gpus}-rates.png")


def cluster_table(args: argparse.Namespace) -> None:
    """The issue-15 table (bench/cluster.py has the three systems' rules and the search)."""

    def floats(text: str) -> tuple[float, ...]:
        return tuple(float(x) for x in text.split(",") if x.strip())

    cfg = TableConfig(
        gpus=tuple(int(g) for g in floats(args.cluster)),
        fractions=floats(args.fractions),
        bursts=floats(args.cluster_bursts),
        slo_factors=floats(args.slo_factors),
        phase_s=args.cluster_phase_s,
        seed=args.seed,
        controlnet_link=None if args.controlnet_link == "local" else args.controlnet_link,
        systems=tuple(args.systems.split(",")),
        warm_fills=floats(args.warm_fills),
        groups=Groups(args.group_size, args.parallel_mode, load_ratios(args.parallel_profile))
        if args.group_size > 1
        else Groups(),
    )
    p = load_profile(args.cluster_profile)
    recorded = list(read_jsonl(args.trace)) if args.trace else None
    print(f"profile: {args.cluster_profile}; trace: {args.trace or 'built (bench/cluster.py poisson_trace)'}")
    if cfg.groups.size > 1:
        groups = f"groups of {cfg.groups.size} GPUs, parallel mode {cfg.groups.mode}"
        print(f"mesh denoisers: {groups} ({args.parallel_profile})")
    print(f"ControlNets: {args.controlnet_link}; SLOs {', '.join(f'{k:g}x' for k in cfg.slo_factors)} solo latency")
    print("cells: attainment at each SLO, per system")
    if len(cfg.warm_fills) > 1:
        fills = ", ".join(f"{f:g}" for f in cfg.warm_fills)
        print(f"warm pool: {', '.join(cfg.warm_systems)} run at fills {fills}, each cell the best (w: a fill > 0 won)")
    results = table(p, cfg, recorded)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cluster.json").write_text(json.dumps({"config": cfg.__dict__, "results": results}, indent=1, default=str))
    cluster_plots(results, out)
    if set(cfg.systems) == {"mesh", "research", "strong"}:
        print()
        for line in summary_lines(results, cfg):
            print(line)


if __name__ == "__main__":
    main()
