"""What the mesh adds to one request: the same sd3 request served by the mesh (REST -> NATS ->
encoder/denoiser/vae processes -> tensor plane -> PNG) and by diffusers' in-process
StableDiffusion3Pipeline over the same tiny models, one request at a time.

Prints median latencies per size, the mesh's added milliseconds, where the mesh's time goes
(model compute on the critical path, bus + tensor hops, the gateway's own part: HTTP, image
pull, PNG encoding), how far the two systems' images differ, and as the last line the ratio
mesh / in-process at the largest size. Full results go to bench/results/overhead.json.

    python bench/overhead.py [--runs 20] [--warmup 2] [--steps 20] [--sizes 256 512]

At the real shapes, on a GPU (SD3-Medium's published architecture with random weights, built
once into the model cache; see `shared.zoo.full_size.write_full_size_sd3`; bf16):

    python bench/overhead.py --full-size --device cuda --sizes 1024 --steps 28 --runs 10

(`bench/gpu/run.sh` runs that, and the tensor plane's CUDA table, on a lent GPU machine.)
`--full-size --max-layers 1 --device cpu --sizes 128 --steps 2` runs the same code on a CPU
with every stack one layer deep: a smoke test of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lego.launcher import Mesh, MeshConfig, free_port  # noqa: E402
from shared.logs import quiet_libraries  # noqa: E402

PROMPT = "a lighthouse on a cliff at dawn, oil painting"


def in_process_runner(steps: int):
    """diffusers' own pipeline over the same models (LEGO_MODELS_DIR / LEGO_DEVICE / LEGO_DTYPE
    of the environment, as the mesh's services read them), PIL output; returns
    `run(size, seed) -> (seconds, image as an array)`."""
    import numpy as np
    import torch

    from baseline.pipelines import build_reference_pipeline
    from shared.settings import Settings
    from shared.tensor_plane.torch_codec import resolve_device

    settings = Settings.from_env()
    settings.device = resolve_device(settings.device)
    pipe = build_reference_pipeline(settings)

    def run(size: int, seed: int) -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        image = pipe(
            prompt=PROMPT,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=7.0,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]
        return time.perf_counter() - t0, np.asarray(image.convert("RGB"))

    return run


def mesh_runner(client: httpx.Client, url: str, steps: int, output_format: str = "png"):
    """One REST request through the mesh; returns `run(size, seed) -> (seconds, node record)`."""

    def run(size: int, seed: int) -> tuple[float, dict, np.ndarray]:
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
                "output_format": output_format,
            },
            headers={"X-Request-Id": request_id},
        )
        elapsed = time.perf_counter() - t0
        r.raise_for_status()
        encoded = base64.b64decode(r.json()["data"][0]["b64_json"])
        image = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
        return elapsed, client.get(f"{url}/v1/requests/{request_id}").json(), image

    return run


def breakdown(total_s: float, record: dict) -> dict[str, float]:
    """Split one mesh request: model compute, bus + tensor hops, and the gateway's own part."""
    wall, compute = record["wall_s"], record["compute_s"]
    encoders = ("clip_l", "clip_g", "t5")
    # The three encoders share one process and its compute thread, so they run one after the
    # other (as in the pipeline): the encode stage computes for the sum of their times.
    encode_wall = max(wall[n] for n in encoders)
    model = min(sum(compute[n] for n in encoders), encode_wall) + compute["denoise"] + compute["decode"]
    stage_wall = encode_wall + wall["denoise"] + wall["decode"]  # the critical path
    return {"model_s": model, "hops_s": stage_wall - model, "gateway_s": total_s - stage_wall}


def gpu_memory_report(mesh_pids: set[int]) -> dict[str, float]:
    """GiB of GPU memory held by the mesh's processes and by this one (the in-process pipeline);
    empty without a GPU. Per process from nvidia-smi; where it cannot see the processes (a
    container's own PID namespace), the mesh's share is the device's used memory less what this
    process's CUDA caching allocator holds."""
    import subprocess

    import torch

    if not torch.cuda.is_available():
        return {}

    def smi(query: str) -> list[list[int]]:
        out = subprocess.run(
            ["nvidia-smi", f"--query-{query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        return [[int(x) for x in line.split(",")] for line in out.strip().splitlines() if line.strip()]

    mine = torch.cuda.memory_reserved() / 2**30
    peak = torch.cuda.max_memory_allocated() / 2**30
    held = {"mesh_gib": 0.0, "in_process_gib": mine, "in_process_peak_allocated_gib": peak}
    try:
        apps = smi("compute-apps=pid,used_memory")
        seen = [mib for pid, mib in apps if pid in mesh_pids]
        if seen:
            held["mesh_gib"] = sum(seen) / 1024
        else:
            used = smi("gpu=memory.used")[0][0] / 1024
            held["mesh_gib"] = max(0.0, used - mine)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        pass
    return held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--device", default=os.environ.get("LEGO_DEVICE", "cpu"), help="cpu, cuda, auto")
    parser.add_argument("--dtype", default=os.environ.get("LEGO_DTYPE", "auto"), help="auto: bf16 on a GPU")
    parser.add_argument("--models-dir", default=os.environ.get("LEGO_MODELS_DIR", ""), help="default: tiny models")
    parser.add_argument(
        "--full-size",
        action="store_true",
        help="SD3-Medium's real architecture, random weights (written once under the model cache)",
    )
    parser.add_argument("--max-layers", type=int, default=0, help="with --full-size: cap each stack's depth (smoke)")
    parser.add_argument(
        "--trace",
        action="store_true",
        help="the mesh prints its spans (OTEL_TRACES_EXPORTER=console); a table of where its time goes follows",
    )
    parser.add_argument(
        "--output-format",
        default="png",
        choices=["png", "jpeg", "webp"],
        help="what the mesh returns (png: lossless, so the pixel difference is exact)",
    )
    parser.add_argument("--ready-timeout", type=float, default=900, help="seconds for the mesh to load its models")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries()

    from shared.settings import Settings
    from shared.tensor_plane.torch_codec import resolve_device

    device = resolve_device(args.device)
    models_dir = args.models_dir
    if args.full_size:
        from shared.zoo.dtypes import model_dtype
        from shared.zoo.full_size import FULL_SIZE_SD3_DIR, write_full_size_sd3

        dtype = str(model_dtype(Settings(device=device, dtype=args.dtype))).removeprefix("torch.")
        name = FULL_SIZE_SD3_DIR + (f"-L{args.max_layers}" if args.max_layers else "") + f"-{dtype}"
        target = Path(Settings.from_env().model_cache_dir) / name
        print(f"full-size SD3-Medium (random weights, {dtype}) in {target} ...", flush=True)
        t0 = time.perf_counter()
        models_dir = str(write_full_size_sd3(target, device=device, dtype=dtype, max_layers=args.max_layers))
        print(f"  ready in {time.perf_counter() - t0:.0f}s", flush=True)
    # The mesh's services and the in-process pipeline read the same settings.
    os.environ |= {"LEGO_DEVICE": device, "LEGO_DTYPE": args.dtype}
    if models_dir:
        os.environ["LEGO_MODELS_DIR"] = models_dir
    if args.trace:  # printing spans costs the services a little time: a diagnosis, not the headline run
        os.environ |= {"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "500"}

    print("starting the mesh (nats-server, encoder, denoiser, vae, gateway) ...", flush=True)
    log_dir = Path(args.out) / "mesh-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    mesh = Mesh(MeshConfig(port=free_port(), quiet=True, log_dir=log_dir, workflows=["sd3"], auth=False))
    t0 = time.perf_counter()
    mesh.start(ready_timeout_s=args.ready_timeout)
    print(f"  ready in {time.perf_counter() - t0:.0f}s", flush=True)
    local: dict[int, list[float]] = {}
    remote: dict[int, list[float]] = {}
    records: dict[int, list[dict]] = {}
    diffs: dict[int, list[int]] = {}
    memory: dict[str, float] = {}
    # Interleaved, one request at a time: both systems see the same machine state (this box is
    # noisy), and neither runs while the other computes.
    print(f"timing: {args.warmup} warm-up + {args.runs} runs per size and system, interleaved ...", flush=True)
    try:
        in_process = in_process_runner(args.steps)
        with httpx.Client(timeout=600) as client:
            through_mesh = mesh_runner(client, mesh.url, args.steps, args.output_format)
            for size in args.sizes:
                for i in range(args.warmup + args.runs):
                    lt, want = in_process(size, i)
                    mt, rec, got = through_mesh(size, i)
                    if i >= args.warmup:
                        local.setdefault(size, []).append(lt)
                        remote.setdefault(size, []).append(mt)
                        records.setdefault(size, []).append(rec)
                        diffs.setdefault(size, []).append(int(np.abs(got.astype(int) - want.astype(int)).max()))
        memory = gpu_memory_report({c.proc.pid for c in mesh.children if c.proc is not None})
    finally:
        mesh.stop()

    rows = []
    where = f"{device}, {'full-size SD3-Medium' if args.full_size else 'tiny models'}, dtype {args.dtype}"
    where += f", mesh returns {args.output_format}"
    print(f"\nsd3, {args.steps} steps, guidance 7, medians of {args.runs} runs ({where})")
    print(
        f"{'size':>9} {'in-process':>11} {'mesh':>9} {'added':>9} {'ratio':>7} {'max px diff':>12}"
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
                "max_pixel_diff": max(diffs[size]),
                "median_breakdown_s": med,
                "records": records[size],
            }
        )
        print(
            f"{size:>4}x{size:<4} {lp * 1000:>9.0f}ms {mp * 1000:>7.0f}ms {(mp - lp) * 1000:>+7.0f}ms {mp / lp:>7.3f}"
            f" {max(diffs[size]):>12}"
            f"   {med['model_s'] * 1000:.0f}ms + {med['hops_s'] * 1000:.1f}ms + {med['gateway_s'] * 1000:.1f}ms"
        )
    if memory:
        print(
            f"GPU memory: mesh processes {memory['mesh_gib']:.1f} GiB, in-process pipeline "
            f"{memory['in_process_gib']:.1f} GiB reserved ({memory['in_process_peak_allocated_gib']:.1f} GiB peak)"
        )
    spans: list[dict[str, float]] = []
    if args.trace:
        from bench.spans import per_request, read_spans, report

        spans = per_request(read_spans(log_dir), [r["request_id"] for recs in records.values() for r in recs])
        print(report(spans))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"spans": spans} if args.trace else {}
    result |= {"steps": args.steps, "runs": args.runs, "device": device, "dtype": args.dtype}
    result["output_format"] = args.output_format
    result |= {"full_size": args.full_size, "max_layers": args.max_layers, "gpu_memory": memory, "rows": rows}
    (out / "overhead.json").write_text(json.dumps(result, indent=2))
    last = rows[-1]
    print(f"ratio mesh/in-process at {last['size']}x{last['size']}: {last['ratio']:.3f}")


if __name__ == "__main__":
    main()
