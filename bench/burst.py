"""Bursts: the micro-served mesh with its autoscaler against the monolithic baseline, same
machine, same run, same trace, same budget.

- Trace: several workflows with skewed popularity; Poisson arrivals at a series of mean rates
  (one phase per rate), then bursts of 2x, 4x, 8x, 16x a base rate, each followed by a
  recovery period at the base rate. The same seeded trace is replayed against both systems.
- (a) micro: `lego.launcher.Mesh` (nats-server, encoder / one denoiser per base model /
  vae processes, gateway) with the autoscaler's local actuator, requests over REST.
  (b) monolithic: `baseline.monolith`, one diffusers pipeline per replica process and
  workflow, scaled by the same autoscaler code at whole-workflow granularity, requests as
  `pipeline` steps over NATS (no HTTP: this favours the baseline by the gateway's cost).
- Budget: the cores (every replica runs torch on one thread; both systems start with the
  same cap of replicas per unit) and a memory budget standing in for GPU memory
  (`--budget-gib`, default 80, one H100): every resident model copy counts its full-size
  bf16 bytes (bench/RESULTS.md "Memory"), a monolithic replica all of its workflow's models,
  a mesh replica only its unit's. The mesh holds each model once; monolithic replicas that do
  not fit are not resident, and a request for their workflow waits for the real load time
  (process start + pipeline load) of one, after the autoscaler frees memory for it.
- SLO per workflow: `--slo-factor` (5) x its solo latency, the faster of the two systems'
  (measured warm, one request at a time, before the trace).

Prints SLO attainment and p50/p99 per system and rate, the highest rate each sustains at
>= 90% attainment, the largest burst each survives (>= 90% of the requests that arrive during
the burst and its recovery within the SLO), and as its last line the capacity ratio
micro/monolithic. Writes bench/results/burst/{results.json,attainment.png}.

    python bench/burst.py [--rates 0.5,1,1.5,2,3,4] [--phase-s 15] [--size 192] [--steps 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from baseline.monolith.launcher import MonolithMesh, plan_monolith_units  # noqa: E402
from bench.plots import attainment_plot  # noqa: E402
from lego.launcher import Mesh, MeshConfig, free_port  # noqa: E402
from shared.logs import quiet_libraries, setup_logging  # noqa: E402
from shared.zoo.full_size import PARAM_GIB  # noqa: E402

GIB = 2**30
# Full-size bf16 parameter bytes of each model (bench/memory.py, bench/RESULTS.md "Memory").
FULL_SIZE_GIB = {**PARAM_GIB, "lora": 0.02}
# Popularity (skewed) of the workflows in the trace.
POPULARITY = {"sd3": 0.45, "flux": 0.25, "sd35-large": 0.15, "sd3-lora": 0.15}


@dataclass
class Arrival:
    at: float  # seconds from the phase start
    workflow: str
    phase: str  # "rate=2" or "burst=8"
    in_burst: bool  # arrived during a burst or its recovery (for burst survival)


@dataclass
class Outcome:
    system: str
    phase: str
    workflow: str
    latency_s: float | None  # None: failed or timed out
    in_burst: bool


def trace(
    rates: list[float], bursts: list[int], phase_s: float, base_rate: float, burst_s: float, recover_s: float, seed: int
):
    """[(phase name, [Arrival])]: one Poisson phase per rate, then one per burst factor."""
    rng = random.Random(seed)
    names, weights = list(POPULARITY), list(POPULARITY.values())

    def poisson(rate: float, start: float, end: float, phase: str, in_burst: bool) -> list[Arrival]:
        out, t = [], start
        while True:
            t += rng.expovariate(rate)
            if t >= end:
                return out
            out.append(Arrival(t, rng.choices(names, weights)[0], phase, in_burst))

    phases = [(f"rate={r:g}", poisson(r, 0.0, phase_s, f"rate={r:g}", False)) for r in rates]
    for k in bursts:
        name = f"burst={k}x"
        arrivals = poisson(base_rate, 0.0, 3.0, name, False)  # steady state first
        arrivals += poisson(base_rate * k, 3.0, 3.0 + burst_s, name, True)
        arrivals += poisson(base_rate, 3.0 + burst_s, 3.0 + burst_s + recover_s, name, True)
        phases.append((name, arrivals))
    return phases


def workflow_models() -> dict[str, list[str]]:
    from shared.workflows.catalogue import get_workflow

    return {w: sorted({m for _, m in get_workflow(w).models()}) for w in POPULARITY}


def memory_per_unit(monolithic: bool) -> dict[str, int]:
    """Full-size bytes one replica of each unit holds resident."""
    from lego.launcher import plan_units

    def gib(models: list[str] | tuple[str, ...], loras: int = 0) -> int:
        return int((sum(FULL_SIZE_GIB[m] for m in models) + loras * FULL_SIZE_GIB["lora"]) * GIB)

    if monolithic:
        from shared.workflows.catalogue import get_workflow

        per_wf = workflow_models()
        return {
            u.name: gib(per_wf[u.models[0]], len(get_workflow(u.models[0]).default_loras))
            for u in plan_monolith_units(list(POPULARITY))
        }
    return {u.name: gib(u.models, 2 if u.name == "sd3-transformer" else 0) for u in plan_units(list(POPULARITY))}


class System:
    """One system under test: started, driven, stopped."""

    def __init__(self, name: str, args: argparse.Namespace, log_dir: Path) -> None:
        self.name = name
        self.args = args
        monolithic = name == "monolithic"
        log_dir.mkdir(parents=True, exist_ok=True)
        env = {
            "LEGO_TORCH_THREADS": "1",  # one core per replica: replicas add real parallelism
            "LEGO_REQUEST_TIMEOUT_S": str(args.timeout),
            "LEGO_LOG_LEVEL": "WARNING",
            "LEGO_AUTOSCALE_MAX": str(args.max_replicas),
            # Every mesh model fits the budget once; monolithic replicas must be able to leave.
            "LEGO_AUTOSCALE_MIN": str(args.mono_min) if monolithic else "1",
            "LEGO_AUTOSCALE_SLO": f"{args.slo_factor:g}x",
            "LEGO_AUTOSCALE_COOLDOWN_S": str(args.cooldown),
            "LEGO_AUTOSCALE_INTERVAL_S": "0.5",
            "LEGO_AUTOSCALE_WINDOW_S": "5",
            "LEGO_AUTOSCALE_MEMORY_BUDGET_GB": str(args.budget_gib),
            "HF_HUB_OFFLINE": "1",
        }
        self.memory = memory_per_unit(monolithic)
        replicas = {}
        if monolithic:  # start with what fits, most popular first
            used = 0
            for wf in POPULARITY:
                unit = f"mono-{wf}"
                fits = used + self.memory[unit] <= args.budget_gib * GIB
                replicas[unit] = 1 if fits else 0
                used += self.memory[unit] if fits else 0
        self.mesh = (MonolithMesh if monolithic else Mesh)(
            MeshConfig(
                port=free_port(),
                workflows=list(POPULARITY),
                replicas=replicas,
                env=env,
                log_dir=log_dir,
                quiet=True,
                auth=False,  # a benchmark's own private mesh: keys would only add a header
            )
        )
        self._stop = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, daemon=True)
        self.replica_log: list[tuple[float, dict[str, int]]] = []

    def start(self) -> None:
        self.mesh.start(ready_timeout_s=600)
        self.mesh.start_autoscaler(memory_per_replica=self.memory)
        self._supervisor.start()

    def _supervise(self) -> None:
        """What `lego up` does each second: restart crashed replicas, reap stopped ones."""
        while not self._stop.wait(1.0):
            self.mesh.restart_dead()
            self.replica_log.append((time.time(), {u: self.mesh.replica_count(u) for u in self.mesh.units}))

    def stop(self) -> None:
        self._stop.set()
        self.mesh.stop()


def params(workflow: str, args: argparse.Namespace, seed: int) -> dict:
    return {
        "prompt": "a red fox in the snow",
        "negative_prompt": "",
        "height": args.size,
        "width": args.size,
        "num_inference_steps": args.steps,
        "guidance_scale": 3.5 if workflow.startswith("flux") else 5.0,
        "seed": seed,
        "n": 1,
    }


class Requests:
    """Sends one request to a system: REST to the mesh's gateway, a `pipeline` step over NATS
    to the monolithic baseline (which has no gateway)."""

    def __init__(self, system: System, args: argparse.Namespace) -> None:
        self.system, self.args = system, args
        self.bus: Any = None
        self.plane: Any = None
        self.client: Any = None
        self.http: httpx.AsyncClient | None = None

    async def start(self) -> None:
        from baseline.monolith.client import MonolithClient
        from shared.bus import Bus
        from shared.tensor_plane import TensorPlane

        if self.system.name != "monolithic":
            self.http = httpx.AsyncClient(timeout=self.args.timeout + 10, limits=httpx.Limits(max_connections=500))
            return
        self.bus = Bus(self.system.mesh.settings(), name="bench-burst")
        await self.bus.connect()
        self.plane = TensorPlane(self.bus.settings)
        await self.plane.start()
        self.client = MonolithClient(self.bus, self.plane)
        await self.client.start()

    async def send(self, workflow: str, seed: int) -> bool:
        """Whether the request was answered with images (raises on a transport failure)."""
        args = self.args
        p = params(workflow, args, seed)
        if self.client is not None:
            await self.client.generate(workflow, p, timeout_s=args.timeout)
            return True
        assert self.http is not None
        body = {
            "prompt": p["prompt"],
            "workflow": workflow,
            "size": f"{args.size}x{args.size}",
            "num_inference_steps": args.steps,
            "guidance_scale": p["guidance_scale"],
            "seed": seed,
        }
        r = await self.http.post(f"{self.system.mesh.url}/v1/images/generations", json=body)
        return r.status_code == 200

    async def close(self) -> None:
        if self.http is not None:
            await self.http.aclose()
        if self.bus is not None:
            await self.bus.close()
            await self.plane.close()


async def run_system(system: System, phases, args: argparse.Namespace) -> tuple[dict[str, float], list[Outcome]]:
    """Solo latencies per workflow, then every phase of the trace (open loop)."""
    requests = Requests(system, args)
    await requests.start()

    async def one(workflow: str, seed: int, scheduled: float | None = None) -> float | None:
        """Latency from the scheduled arrival (a late client does not hide queueing), None if failed."""
        t0 = time.perf_counter() if scheduled is None else scheduled
        try:
            if not await requests.send(workflow, seed):
                return None
        except Exception:
            return None
        return time.perf_counter() - t0

    solo = {}
    for wf in POPULARITY:  # warm, then one at a time
        for _ in range(2):
            await one(wf, 1)
        times = [t for t in [await one(wf, 2 + i) for i in range(5)] if t is not None]
        solo[wf] = statistics.median(times) if times else math.inf
    print(f"  {system.name}: solo latency " + ", ".join(f"{w} {s * 1000:.0f} ms" for w, s in solo.items()), flush=True)
    await asyncio.sleep(args.cooldown + 5)  # the trace starts from a settled system, not mid-scaling

    outcomes: list[Outcome] = []
    seed = 1000
    for phase, arrivals in phases:
        start = time.perf_counter()
        tasks = []
        for a in arrivals:
            await asyncio.sleep(max(0.0, start + a.at - time.perf_counter()))
            seed += 1
            tasks.append((a, asyncio.create_task(one(a.workflow, seed, start + a.at))))
        for a, task in tasks:
            outcomes.append(Outcome(system.name, phase, a.workflow, await task, a.in_burst))
        done = [o for o in outcomes if o.phase == phase]
        ok = sum(1 for o in done if o.latency_s is not None)
        print(f"  {system.name} {phase}: {len(done)} requests, {ok} answered", flush=True)
        await asyncio.sleep(args.gap_s)  # let queues drain and the autoscaler settle a little
    await requests.close()
    return solo, outcomes


def summarise(outcomes: list[Outcome], slo_of, systems: list[str]) -> dict:
    table: dict = {}
    for system in systems:
        for phase in dict.fromkeys(o.phase for o in outcomes):
            rows = [o for o in outcomes if o.system == system and o.phase == phase]
            if phase.startswith("burst"):
                rows = [o for o in rows if o.in_burst]
            lat = sorted(o.latency_s if o.latency_s is not None else math.inf for o in rows)
            met = sum(1 for o in rows if o.latency_s is not None and o.latency_s <= slo_of(system, o.workflow))
            table.setdefault(system, {})[phase] = {
                "requests": len(rows),
                "attainment": met / len(rows) if rows else 1.0,
                "p50_s": _pct(lat, 50),
                "p99_s": _pct(lat, 99),
                "failed": sum(1 for o in rows if o.latency_s is None),
            }
    return table


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    k = min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))
    return values[k]


def plot(table: dict, rates: list[float], path: Path) -> None:
    """Attainment versus rate, one line per system."""
    series = {system: [(r, phases[f"rate={r:g}"]["attainment"]) for r in rates] for system, phases in table.items()}
    attainment_plot(series, "SLO attainment vs rate (bench/burst.py)", "request rate (req/s)", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="0.5,1,1.5,2,3,4", help="mean request rates of the Poisson phases (req/s)")
    parser.add_argument("--phase-s", type=float, default=15.0, help="seconds of arrivals per rate phase")
    parser.add_argument("--bursts", default="2,4,8,16", help="burst factors (x the base rate)")
    parser.add_argument("--base-rate", type=float, default=0.5, help="rate the bursts multiply (req/s)")
    parser.add_argument("--burst-s", type=float, default=4.0, help="seconds each burst lasts")
    parser.add_argument("--recover-s", type=float, default=10.0, help="seconds at the base rate after a burst")
    parser.add_argument("--gap-s", type=float, default=3.0, help="pause between phases")
    parser.add_argument("--size", type=int, default=192, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=16, help="denoising steps")
    parser.add_argument("--slo-factor", type=float, default=5.0, help="SLO = this x the solo latency")
    parser.add_argument("--budget-gib", type=float, default=80.0, help="memory budget standing in for GPU memory")
    parser.add_argument(
        "--max-replicas", type=int, default=2, help="replicas per unit at most, both systems (2: this box's cores)"
    )
    parser.add_argument(
        "--mono-min",
        type=int,
        default=0,
        help="monolithic replicas per workflow at least (0: a workflow that does not fit can wait for memory)",
    )
    parser.add_argument("--cooldown", type=float, default=10.0, help="autoscaler cooldown (s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="a request slower than this failed (s)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "burst"))
    parser.add_argument("--from-results", help="print the report of an earlier run's results.json, run nothing")
    args = parser.parse_args()
    if args.from_results:
        path = Path(args.from_results)
        report(json.loads(path.read_text()), path.parent)
        return
    quiet_libraries()
    setup_logging("bench", "WARNING")
    logging.getLogger("lego.autoscaler").setLevel(logging.INFO)  # its decisions, with their reasons
    logging.getLogger("lego.bus").setLevel(logging.ERROR)  # short-lived connections' disconnect notices
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rates = [float(r) for r in args.rates.split(",")]
    bursts = [int(k) for k in args.bursts.split(",")]
    phases = trace(rates, bursts, args.phase_s, args.base_rate, args.burst_s, args.recover_s, args.seed)
    print(
        f"trace: {sum(len(a) for _, a in phases)} requests, workflows {POPULARITY}, "
        f"{args.size}x{args.size} {args.steps} steps, budget {args.budget_gib:g} GiB, {os.cpu_count()} cores",
        flush=True,
    )
    solos, outcomes, replica_logs = {}, [], {}
    started = time.time()
    for name in ("micro", "monolithic"):
        system = System(name, args, out / f"logs-{name}")
        t0 = time.time()
        system.start()
        print(f"{name}: up in {time.time() - t0:.0f}s", flush=True)
        try:
            solos[name], got = asyncio.run(run_system(system, phases, args))
            outcomes += got
        finally:
            replica_logs[name] = system.replica_log
            system.stop()
    results = {
        "args": vars(args),
        "solo_s": solos,
        "memory_per_unit_gib": {
            "micro": {u: b / GIB for u, b in memory_per_unit(False).items()},
            "monolithic": {u: b / GIB for u, b in memory_per_unit(True).items()},
        },
        "replicas": replica_logs,
        "outcomes": [asdict(o) for o in outcomes],
        "wall_s": time.time() - started,
    }
    report(results, out)


def report(results: dict, out: Path) -> None:
    """Tables, capacity, burst survival, the plot; the figures are added to results.json."""
    args = argparse.Namespace(**results["args"])
    solos, outcomes = results["solo_s"], [Outcome(**o) for o in results["outcomes"]]
    rates = [float(r) for r in args.rates.split(",")]
    bursts = [int(k) for k in args.bursts.split(",")]
    systems = list(solos)
    k = args.slo_factor
    # Primary: each system against k x its own solo latency (how well it keeps its unloaded
    # latency under load). Also: one SLO for both, k x the faster system's solo latency.
    own = {s: {wf: k * solos[s][wf] for wf in POPULARITY} for s in systems}
    common = {wf: k * min(solos[s][wf] for s in systems) for wf in POPULARITY}
    figures = {}
    for name, slo_of in (("own", lambda s, wf: own[s][wf]), ("common", lambda s, wf: common[wf])):
        table = summarise(outcomes, slo_of, systems)
        capacity = {
            s: max([r for r in rates if table[s][f"rate={r:g}"]["attainment"] >= 0.9], default=0.0) for s in systems
        }
        burst = {
            s: max([b for b in bursts if table[s][f"burst={b}x"]["attainment"] >= 0.9], default=0) for s in systems
        }
        figures[name] = {"table": table, "capacity_req_s": capacity, "largest_burst": burst}
    print(
        "\nsolo latency (s): "
        + "; ".join(f"{s} " + ", ".join(f"{w} {v:.2f}" for w, v in solos[s].items()) for s in systems)
    )
    print(f"SLO = {k:g}x the system's own solo latency (a common SLO, {k:g}x the faster one's, at the end)")
    table = figures["own"]["table"]
    print(f"{'phase':<12}" + "".join(f"{s + ' attain':>18}{'p50 s':>8}{'p99 s':>8}" for s in systems))
    for phase in table[systems[0]]:
        row = f"{phase:<12}"
        for s in systems:
            r = table[s][phase]
            row += f"{r['attainment']:>17.0%} {r['p50_s']:>7.2f} {r['p99_s']:>7.2f}"
        print(row)
    for name in ("own", "common"):
        f = figures[name]
        print(
            f"[{name} SLO] highest rate at >= 90%: "
            + ", ".join(f"{s} {f['capacity_req_s'][s]:g} req/s" for s in systems)
            + "; largest burst survived: "
            + ", ".join(f"{s} {f['largest_burst'][s]}x" for s in systems)
        )
    plot(table, rates, out / "attainment.png")
    results.update({"slo_s": {"own": own, "common": common}, "figures": figures})
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'results.json'} and {out / 'attainment.png'}")
    capacity, burst = figures["own"]["capacity_req_s"], figures["own"]["largest_burst"]
    print(f"burst ratio micro/monolithic: {_ratio(burst['micro'], burst['monolithic'], min(bursts))}")
    print(f"capacity ratio micro/monolithic: {_ratio(capacity['micro'], capacity['monolithic'], min(rates))}")


def _ratio(micro: float, mono: float, floor: float) -> str:
    """micro / mono; when the baseline passed nowhere, a lower bound (it stays below the lowest
    value tried, so the ratio is above micro / that value)."""
    if mono:
        return f"{micro / mono:.2f}"
    if not micro:
        return "n/a (neither reached 90%)"
    return f"> {micro / floor:.2f} (monolithic below {floor:g}, the lowest tried)"


if __name__ == "__main__":
    main()
