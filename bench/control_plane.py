"""The control plane's own speed: how many steps a second JetStream and the step worker move to
replicas that do nothing, and how many requests a second one or two real gateways plan and
complete over no-op models. Everything is real but the models: a nats-server with JetStream
(file storage) started here, replica processes on the mesh's consume loop
(`bench/noop_steps.py`, `bench/noop_service.py`), the gateway's process and orchestrator.

Besides rates and latencies it reports the CPU each process spent per step and per request
(what limits the rate on a shared box, and what a core of each buys), and what that means at
1,000 GPUs. Full results go to bench/results/control_plane.json; the last line is
`control plane: S steps/s, p50 P ms` (16 replicas, one gateway's connection: steps/s under
load, p50 of one step's round trip).

    python bench/control_plane.py            # 1, 4, 16 replicas; 1 and 2 gateways (~2 min)
    python bench/control_plane.py --quick    # 1 and 4 replicas (packed in 2 processes), 1 gateway (~30 s)

CPLANE_PROFILE=1 writes cProfile files (CPU time) of the no-op replicas and the gateways.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gateway_load import run_gateways  # noqa: E402
from bench.hop import run_hops  # noqa: E402
from shared import lifecycle  # noqa: E402

OUT = ROOT / "bench" / "results" / "control_plane.json"
PROFILES = ROOT / "bench" / "profiles" / "h100-sd3.json"
GPUS = 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (under ~30 s): 1 and 4 replicas, 1 gateway")
    parser.add_argument(
        "--replicas", type=int, nargs="*", default=None, help="replica counts (default 1 4 16; none: skip the hop)"
    )
    parser.add_argument("--gateways", type=int, nargs="*", default=None, help="gateways (default 1 2; none: skip)")
    parser.add_argument("--seconds", type=float, default=None, help="each measurement's window (default 8; quick 2)")
    parser.add_argument("--in-flight", type=int, default=32, help="steps one driver keeps in flight (default 32)")
    parser.add_argument("--clients", type=int, default=16, help="requests in flight per gateway (default 16)")
    parser.add_argument(
        "--processes",
        type=int,
        default=None,
        help="at most this many replica processes (default: one per replica; quick: 2)",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.replicas is None:
        args.replicas = [1, 4] if args.quick else [1, 4, 16]
    if args.gateways is None:
        args.gateways = [1] if args.quick else [1, 2]
    if args.seconds is None:
        args.seconds = 2.0 if args.quick else 8.0
    if args.processes is None:
        args.processes = 2 if args.quick else 0
    return args


def cluster_needs(gpus: int = GPUS, steps: int = 28) -> dict[str, float]:
    """What `gpus` H100s serving SD3-Medium (1024 px, `steps` steps) ask of the control plane,
    from the stages measured on one H100 (bench/profiles/h100-sd3.json). A GPU finishes a
    request every `request_s`: the denoising loop's 1.5 s when encoders and VAE batch well
    enough to cost little (the upper bound on the rate, so the harder target), or every stage
    in turn (the lower bound). A request is 5 bus steps (3 encodes, the denoising loop, the
    decode) and `steps` progress messages from the denoiser to its gateway (core NATS)."""
    stages = json.loads(PROFILES.read_text())["step_s"]
    request_s = float(stages["sd3-transformer"])
    per_s = gpus / request_s
    return {
        "gpus": gpus,
        "request_s_per_gpu": request_s,
        "request_s_per_gpu_all_stages": round(sum(stages.values()), 3),
        "requests_per_s": round(per_s, 1),
        "bus_steps_per_s": round(per_s * 5, 1),
        "progress_messages_per_s": round(per_s * steps, 1),
    }


def capacity(hops: list[dict], gateways: list[dict], needs: dict[str, float]) -> dict[str, float]:
    """What one core of each central part serves (1 / its CPU per step or request), and how many
    gateways (one core each) the cluster needs."""
    out: dict[str, float] = {}
    if gateways:
        one = gateways[0]["cpu_ms_per_request"]
        out["gateway_requests_per_core_s"] = round(1e3 / one["gateway"], 1)
        out["nats_requests_per_core_s"] = round(1e3 / one["nats-server"], 1)
        out["gateways_needed"] = round(needs["requests_per_s"] / out["gateway_requests_per_core_s"], 1)
        out["nats_cores_needed"] = round(needs["requests_per_s"] / out["nats_requests_per_core_s"], 1)
    if hops:
        top = hops[-1]["cpu_ms_per_step"]
        out["driver_steps_per_core_s"] = round(1e3 / top["driver"], 1)
        out["nats_steps_per_core_s"] = round(1e3 / top["nats-server"], 1)
        out["replica_steps_per_core_s"] = round(1e3 / top["replicas"], 1)  # all replicas' CPU over all steps
    return out


def print_hops(hops: list[dict]) -> None:
    print("\nstep hop: JetStream -> no-op replicas (StepWorker) -> result stream -> the driver")
    print(
        f"{'replicas':>8} {'procs':>5} {'steps/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'solo p50':>8} {'solo p99':>8}"
        f" {'published':>9} {'delivered':>9} {'results':>8}  CPU ms/step (driver / nats / replicas)"
    )
    for r in hops:
        cpu = r["cpu_ms_per_step"]
        print(
            f"{r['replicas']:>8} {r['processes']:>5} {r['steps_per_s']:>8.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f}"
            f" {r['solo_p50_ms']:>8.2f} {r['solo_p99_ms']:>8.2f} {r['published']:>9} {r['delivered']:>9}"
            f" {r['results']:>8}  {cpu['driver']:.3f} / {cpu['nats-server']:.3f} / {cpu['replicas']:.3f}"
        )
    floor, bare_js = hops[0]["echo_floor"], hops[0]["js_floor"]
    print(
        f"(p50/p99 under load: {hops[0]['in_flight']} steps in flight; solo: one step at a time; "
        f"the box's floors, between two Python processes: a bare core-NATS request/reply "
        f"p50 {floor['p50_ms']:.2f} ms, p99 {floor['p99_ms']:.2f} ms; a bare JetStream step hop "
        f"(publish, pull, result published, pushed back; no parsing) p50 {bare_js['p50_ms']:.2f} ms, "
        f"p99 {bare_js['p99_ms']:.2f} ms)"
    )


def print_gateways(gateways: list[dict]) -> None:
    print("\nrequests through real gateways (sd3 plan: 5 steps) over no-op models")
    print(
        f"{'gateways':>8} {'clients':>7} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}"
        "  CPU ms/request (gateways / nats / replicas / client)"
    )
    for g in gateways:
        cpu = g["cpu_ms_per_request"]
        print(
            f"{g['gateways']:>8} {g['in_flight']:>7} {g['requests_per_s']:>7.1f} {g['p50_ms']:>7.1f}"
            f" {g['p99_ms']:>7.1f} {g['errors']:>6}  {cpu['gateway']:.2f} / {cpu['nats-server']:.2f} /"
            f" {cpu['replicas']:.2f} / {cpu['client']:.2f}"
        )
    for name, breakdown in gateways[-1].get("profiles", {}).items():
        total = sum(breakdown.values()) or 1.0
        parts = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in breakdown.items())
        print(f"{name} CPU by code (cProfile, whole life): {parts}")


def print_tables(result: dict) -> None:
    if result["hops"]:
        print_hops(result["hops"])
    if result["gateways"]:
        print_gateways(result["gateways"])
    needs, cap = result["at_1000_gpus"], result["capacity"]
    print(
        f"\nat {needs['gpus']} GPUs ({needs['request_s_per_gpu']} s per SD3 request per H100): "
        f"{needs['requests_per_s']} req/s, {needs['bus_steps_per_s']} bus steps/s, "
        f"{needs['progress_messages_per_s']} progress messages/s (one a denoising iteration)"
    )
    if "gateways_needed" in cap:
        print(
            f"one gateway core: {cap['gateway_requests_per_core_s']} req/s -> {cap['gateways_needed']} gateways;"
            f" nats-server: {cap['nats_requests_per_core_s']} req/s a core -> {cap['nats_cores_needed']} cores"
        )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    solo = 100 if args.quick else 500
    hops = []
    if args.replicas:
        hops = lifecycle.run(run_hops(args.replicas, args.seconds, args.in_flight, solo, args.processes))
    gateways = lifecycle.run(run_gateways(args.gateways, args.clients, args.seconds)) if args.gateways else []
    needs = cluster_needs()
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "hops": hops,
        "gateways": gateways,
        "at_1000_gpus": needs,
        "capacity": capacity(hops, gateways, needs),
        "took_s": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)
    print(f"\nfull results: {args.out} ({result['took_s']} s)")
    if hops:
        print(last_line(hops[-1]))
    return result


def last_line(hop: dict) -> str:
    """The line the issue asks for: steps/s under load, p50 of one step's round trip."""
    return f"control plane: {hop['steps_per_s']:.0f} steps/s, p50 {hop['solo_p50_ms']:.2f} ms"


if __name__ == "__main__":
    main()
