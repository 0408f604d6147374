"""What step-level batching buys a denoiser: a burst of requests through one BatchEngine at
several max batch sizes, in one process (the denoiser's own compute path, no bus).

For each max batch: all requests submitted at once (same size, different seeds), the time
until the last finishes, throughput, mean latency, the batch sizes the engine actually ran,
and the speed-up against max batch 1 (each request's loop alone, one after the other: what a
denoiser replica without batching does). The last line is the best throughput speed-up.

    python bench/batching.py [--requests 16] [--batches 1 2 4 8] [--size 256] [--steps 20]
    python bench/batching.py --full-size --device cuda --size 1024 --steps 28   # on a GPU

`--full-size` loads SD3-Medium's real transformer (random weights, bf16 on a GPU; the
directory `bench/overhead.py --full-size` writes, built here if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.logs import quiet_libraries  # noqa: E402
from shared.settings import Settings  # noqa: E402


def load_transformer(args: argparse.Namespace):
    from shared.tensor_plane.torch_codec import resolve_device
    from shared.zoo import load_denoiser

    device = resolve_device(args.device)
    settings = Settings.from_env(device=device, dtype=args.dtype)
    if args.full_size:
        from shared.zoo.dtypes import model_dtype
        from shared.zoo.full_size import FULL_SIZE_SD3_DIR, write_full_size_sd3

        dtype = str(model_dtype(settings)).removeprefix("torch.")
        name = f"{FULL_SIZE_SD3_DIR}{f'-L{args.max_layers}' if args.max_layers else ''}-{dtype}"
        target = Path(settings.model_cache_dir) / name
        settings.models_dir = str(write_full_size_sd3(target, device, dtype, args.max_layers))
    return load_denoiser("sd3-transformer", settings), settings


def request_inputs(bundle, seed: int):
    """Encoder outputs of SD3's real sequence lengths (77 CLIP + 256 T5 tokens), random values."""
    import torch

    from services.denoiser.denoise import warm_up_inputs

    gen = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in warm_up_inputs(bundle).items()}
    shapes["t5_embeds"] = (2, 256, shapes["t5_embeds"][-1])
    device = next(bundle.transformer.parameters()).device
    dtype = bundle.transformer.dtype
    return {k: torch.randn(s, generator=gen).to(device=device, dtype=dtype) for k, s in shapes.items()}


def burst(bundle, max_batch: int, args: argparse.Namespace) -> dict:
    import torch

    from services.denoiser.batching import BatchEngine
    from services.denoiser.denoise import denoise_loop
    from services.denoiser.loop import DenoiseInputs

    engine = BatchEngine(bundle.transformer, max_batch, activate_loras=lambda loras: None)
    inputs = [request_inputs(bundle, seed) for seed in range(args.requests)]
    kw = {"height": args.size, "width": args.size, "num_inference_steps": args.steps, "guidance_scale": 5.0}
    try:
        t0 = time.perf_counter()
        futures = [engine.submit(denoise_loop(bundle, DenoiseInputs(x, seed=i, **kw))) for i, x in enumerate(inputs)]
        done_at = []
        for f in futures:  # results come in order of submission; each is timed when it is there
            f.result()
            done_at.append(time.perf_counter() - t0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    finally:
        engine.close()
    return {
        "max_batch": max_batch,
        "wall_s": wall,
        "throughput_rps": args.requests / wall,
        "mean_latency_s": statistics.mean(done_at),
        "batch_sizes": dict(sorted(engine.batch_sizes.items())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default=os.environ.get("LEGO_DEVICE", "cpu"))
    parser.add_argument("--dtype", default=os.environ.get("LEGO_DTYPE", "auto"))
    parser.add_argument("--full-size", action="store_true", help="SD3-Medium's real transformer, random weights")
    parser.add_argument("--max-layers", type=int, default=0, help="with --full-size: cap the depth (smoke)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries()
    import torch

    bundle, settings = load_transformer(args)
    print(
        f"sd3 denoiser ({'full-size SD3-Medium' if args.full_size else 'tiny'}, {settings.device}, "
        f"{bundle.transformer.dtype}, torch threads {torch.get_num_threads()}): {args.requests} requests at once, "
        f"{args.size}x{args.size}, {args.steps} steps, guidance 5",
        flush=True,
    )
    burst(bundle, 1, argparse.Namespace(**{**vars(args), "requests": 1, "steps": 2}))  # warm-up
    rows = []
    print(f"{'max batch':>9} {'wall s':>8} {'req/s':>7} {'mean latency s':>15} {'speed-up':>9}   calls by batch size")
    for b in args.batches:
        row = burst(bundle, b, args)
        row["speedup"] = row["throughput_rps"] / rows[0]["throughput_rps"] if rows else 1.0
        rows.append(row)
        print(
            f"{b:>9} {row['wall_s']:>8.2f} {row['throughput_rps']:>7.2f} {row['mean_latency_s']:>15.2f}"
            f" {row['speedup']:>8.2f}x   {row['batch_sizes']}",
            flush=True,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in vars(args).items() if k != "out"} | {"device": settings.device}
    (out / "batching.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    best = max(rows, key=lambda r: r["speedup"])
    print(f"best throughput speed-up from batching: {best['speedup']:.2f}x at max batch {best['max_batch']}")


if __name__ == "__main__":
    main()
