"""What the mesh adds to one request: the same sd3 request served by the mesh (REST -> NATS ->
encoder/denoiser/vae processes -> tensor plane -> PNG) and by diffusers' in-process
StableDiffusion3Pipeline over the same tiny models, one request at a time.

Prints median latencies per size, the mesh's added milliseconds, where the added time goes
(sum of model compute reported by the services vs. end-to-end), and as the last line the
ratio mesh / in-process at the largest size. Full results go to bench/results/overhead.json.

    python bench/overhead.py [--runs 10] [--warmup 2] [--steps 20] [--sizes 256 512]
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


def time_in_process(sizes: list[int], steps: int, runs: int, warmup: int) -> dict[int, list[float]]:
    """diffusers' own pipeline, PIL output (what the mesh's PNG encodes), same models."""
    import torch

    from shared.settings import Settings
    from shared.zoo import build_reference_pipeline

    pipe = build_reference_pipeline(Settings.from_env())
    times: dict[int, list[float]] = {}
    for size in sizes:
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            pipe(
                prompt=PROMPT,
                height=size,
                width=size,
                num_inference_steps=steps,
                guidance_scale=7.0,
                generator=torch.Generator("cpu").manual_seed(i),
            )
            if i >= warmup:
                times.setdefault(size, []).append(time.perf_counter() - t0)
    return times


def time_mesh(url: str, sizes: list[int], steps: int, runs: int, warmup: int) -> tuple[dict, dict]:
    times: dict[int, list[float]] = {}
    compute: dict[int, list[dict[str, float]]] = {}
    with httpx.Client(timeout=600) as client:
        for size in sizes:
            for i in range(warmup + runs):
                request_id = uuid.uuid4().hex
                t0 = time.perf_counter()
                r = client.post(
                    f"{url}/v1/images/generations",
                    json={
                        "prompt": PROMPT,
                        "size": f"{size}x{size}",
                        "num_inference_steps": steps,
                        "guidance_scale": 7.0,
                        "seed": i,
                    },
                    headers={"X-Request-Id": request_id},
                )
                elapsed = time.perf_counter() - t0
                r.raise_for_status()
                base64.b64decode(r.json()["data"][0]["b64_json"])
                if i >= warmup:
                    times.setdefault(size, []).append(elapsed)
                    status = client.get(f"{url}/v1/requests/{request_id}").json()
                    compute.setdefault(size, []).append(status["compute_s"])
    return times, compute


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries()

    print(f"in-process diffusers pipeline: {args.warmup} warm-up + {args.runs} runs per size ...", flush=True)
    local = time_in_process(args.sizes, args.steps, args.runs, args.warmup)

    print("starting the mesh (nats-server, encoder, denoiser, vae, gateway) ...", flush=True)
    mesh = Mesh(MeshConfig(port=free_port(), quiet=True, log_dir=Path(args.out) / "mesh-logs"))
    (Path(args.out) / "mesh-logs").mkdir(parents=True, exist_ok=True)
    mesh.start()
    try:
        remote, compute = time_mesh(mesh.url, args.sizes, args.steps, args.runs, args.warmup)
    finally:
        mesh.stop()

    rows = []
    print(f"\nsd3, {args.steps} steps, guidance 7, medians of {args.runs} runs (2-core CPU, tiny models)")
    print(
        f"{'size':>9} {'in-process':>11} {'mesh':>9} {'added':>9} {'ratio':>7}"
        "   mesh compute: encoders / denoise / decode"
    )
    for size in args.sizes:
        lp, mp = statistics.median(local[size]), statistics.median(remote[size])
        node_medians = {
            node: statistics.median(run.get(node, 0.0) for run in compute[size]) for node in compute[size][0]
        }
        encoders = max(node_medians.get(n, 0.0) for n in ("clip_l", "clip_g", "t5"))
        rows.append(
            {
                "size": size,
                "in_process_s": local[size],
                "mesh_s": remote[size],
                "median_in_process_s": lp,
                "median_mesh_s": mp,
                "added_ms": (mp - lp) * 1000,
                "ratio": mp / lp,
                "mesh_compute_median_s": node_medians,
            }
        )
        print(
            f"{size:>4}x{size:<4} {lp * 1000:>9.0f}ms {mp * 1000:>7.0f}ms {(mp - lp) * 1000:>+7.0f}ms {mp / lp:>7.3f}"
            f"   {sum(node_medians.get(n, 0.0) for n in ('clip_l', 'clip_g', 't5')) * 1000:.0f}ms"
            f" (longest {encoders * 1000:.0f}) / {node_medians.get('denoise', 0) * 1000:.0f}ms"
            f" / {node_medians.get('decode', 0) * 1000:.0f}ms"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps({"steps": args.steps, "runs": args.runs, "rows": rows}, indent=2))
    last = rows[-1]
    print(f"ratio mesh/in-process at {last['size']}x{last['size']}: {last['ratio']:.3f}")


if __name__ == "__main__":
    main()
