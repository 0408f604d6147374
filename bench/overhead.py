"""What the mesh adds to one request: the same sd3 request served by the mesh (REST -> NATS ->
encoder/denoiser/vae processes -> tensor plane -> PNG) and by diffusers' in-process
StableDiffusion3Pipeline over the same tiny models, one request at a time.

Prints median latencies per size, the mesh's added milliseconds, where the mesh's time goes
(model compute on the critical path, bus + tensor hops, the gateway's own part: HTTP, image
pull, PNG encoding), and as the last line the ratio mesh / in-process at the largest size.
Full results go to bench/results/overhead.json.

    python bench/overhead.py [--runs 20] [--warmup 2] [--steps 20] [--sizes 256 512]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lego.launcher import Mesh, MeshConfig, free_port  # noqa: E402
from shared.logs import quiet_libraries  # noqa: E402

PROMPT = "a lighthouse on a cliff at dawn, oil painting"


def in_process_runner(steps: int):
    """diffusers' own pipeline over the same zoo models, PIL output; returns `run(size, seed)`."""
    import torch

    from shared.settings import Settings
    from shared.zoo import build_reference_pipeline

    pipe = build_reference_pipeline(Settings.from_env())

    def run(size: int, seed: int) -> float:
        t0 = time.perf_counter()
        pipe(
            prompt=PROMPT,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=7.0,
            generator=torch.Generator("cpu").manual_seed(seed),
        )
        return time.perf_counter() - t0

    return run


def mesh_runner(client: httpx.Client, url: str, steps: int):
    """One REST request through the mesh; returns `run(size, seed) -> (seconds, node record)`."""

    def run(size: int, seed: int) -> tuple[float, dict]:
        request_id = uuid.uuid4().hex
        t0 = time.perf_counter()
        r = client.post(
            f"{url}/v1/images/generations",
            json={
                "prompt": PROMPT,
                "size": f"{size}x{size}",
                "num_inference_steps": steps,
                "guidance_scale": 7.0,
                "seed": seed,
            },
            headers={"X-Request-Id": request_id},
        )
        elapsed = time.perf_counter() - t0
        r.raise_for_status()
        base64.b64decode(r.json()["data"][0]["b64_json"])
        return elapsed, client.get(f"{url}/v1/requests/{request_id}").json()

    return run


def breakdown(total_s: float, record: dict) -> dict[str, float]:
    """Split one mesh request: model compute, bus + tensor hops, and the gateway's own part."""
    wall, compute = record["wall_s"], record["compute_s"]
    encoders = ("clip_l", "clip_g", "t5")
    stages = [max(encoders, key=lambda n: wall[n]), "denoise", "decode"]  # the critical path
    model = sum(compute[n] for n in stages)
    stage_wall = sum(wall[n] for n in stages)
    return {"model_s": model, "hops_s": stage_wall - model, "gateway_s": total_s - stage_wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries()

    print("starting the mesh (nats-server, encoder, denoiser, vae, gateway) ...", flush=True)
    log_dir = Path(args.out) / "mesh-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    mesh = Mesh(MeshConfig(port=free_port(), quiet=True, log_dir=log_dir))
    mesh.start()
    local: dict[int, list[float]] = {}
    remote: dict[int, list[float]] = {}
    records: dict[int, list[dict]] = {}
    # Interleaved, one request at a time: both systems see the same machine state (this box is
    # noisy), and neither runs while the other computes.
    print(f"timing: {args.warmup} warm-up + {args.runs} runs per size and system, interleaved ...", flush=True)
    try:
        in_process = in_process_runner(args.steps)
        with httpx.Client(timeout=600) as client:
            through_mesh = mesh_runner(client, mesh.url, args.steps)
            for size in args.sizes:
                for i in range(args.warmup + args.runs):
                    lt = in_process(size, i)
                    mt, rec = through_mesh(size, i)
                    if i >= args.warmup:
                        local.setdefault(size, []).append(lt)
                        remote.setdefault(size, []).append(mt)
                        records.setdefault(size, []).append(rec)
    finally:
        mesh.stop()

    rows = []
    print(f"\nsd3, {args.steps} steps, guidance 7, medians of {args.runs} runs (2-core CPU, tiny models)")
    print(
        f"{'size':>9} {'in-process':>11} {'mesh':>9} {'added':>9} {'ratio':>7}"
        "   mesh = model compute + bus/tensor hops + gateway (HTTP, image pull, PNG)"
    )
    for size in args.sizes:
        lp, mp = statistics.median(local[size]), statistics.median(remote[size])
        parts = [breakdown(t, rec) for t, rec in zip(remote[size], records[size], strict=True)]
        med = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
        rows.append(
            {
                "size": size,
                "in_process_s": local[size],
                "mesh_s": remote[size],
                "median_in_process_s": lp,
                "median_mesh_s": mp,
                "added_ms": (mp - lp) * 1000,
                "ratio": mp / lp,
                "median_breakdown_s": med,
                "records": records[size],
            }
        )
        print(
            f"{size:>4}x{size:<4} {lp * 1000:>9.0f}ms {mp * 1000:>7.0f}ms {(mp - lp) * 1000:>+7.0f}ms {mp / lp:>7.3f}"
            f"   {med['model_s'] * 1000:.0f}ms + {med['hops_s'] * 1000:.1f}ms + {med['gateway_s'] * 1000:.1f}ms"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps({"steps": args.steps, "runs": args.runs, "rows": rows}, indent=2))
    last = rows[-1]
    print(f"ratio mesh/in-process at {last['size']}x{last['size']}: {last['ratio']:.3f}")


if __name__ == "__main__":
    main()
