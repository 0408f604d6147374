"""LoRAs loaded on demand: what it costs a request against having every LoRA loaded beforehand.

Drives a denoiser's two LoRA caches directly (`HostLoraCache`: files read into host memory;
`LoraCache`: adapters loaded into the tiny SD3 transformer), no mesh: on a 2-core box a full
mesh would measure its own queueing, not the caches. The request path is the denoiser's:

- `--loras` (1,000) tiny LoRAs of the SD3 base are written to a temp dir (a mix of the two
  built-ins' tensors with random gains: distinct files, real layers), as if registered;
- a Poisson stream of `--requests` at `--rate` per second, each naming one LoRA drawn with
  Zipf(`--zipf`) popularity (rank 1 the most popular);
- at arrival the gateway's prefetch hint starts the file read (a reader thread), while the
  request's prompt is encoded (`--encode-ms`); then the compute thread (one, as in a
  denoiser) takes the request: it waits for the read if still running, loads the adapter into
  the transformer if the device cache lacks it, switches to it, and denoises (`--denoise-ms`).
- added latency: from "encoded and the compute thread free" to "LoRA active". The same
  stream is run again with every LoRA preloaded: every file in host memory, and each request's
  adapter already in the network when its turn comes (put there untimed just before; a peft
  network literally holding 1,000 adapters is no baseline: each load and switch walks every
  resident adapter, which is why the device cache also caps their count). There the added
  latency is the switch alone.

Also one full-size LoRA: SD3-Medium's MMDiT, rank 64 on every attention projection (to_q/k/v,
to_out, and the context stream's add_q/k/v and to_add_out), random bf16 weights in a
safetensors file in a temp dir: its read time from disk (the page cache dropped for the file
first) and, unless `--no-full-device`, its load into the full-size transformer (bf16, CPU): into
a new slot (peft injects its layers), and swapped into the slot of another such LoRA in a full
cache (what a denoiser with thousands of LoRAs pays at nearly every miss).

    python bench/loras.py [--loras 1000] [--requests 1000] [--rate 12] [--host-frac 0.25] [--device-frac 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.logs import quiet_libraries  # noqa: E402
from shared.settings import Settings  # noqa: E402

SD3_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def write_loras(n: int, settings: Settings, into: Path, seed: int) -> list[Path]:
    import safetensors.torch
    import torch

    from shared.zoo import lora_path

    a, b = (
        safetensors.torch.load_file(str(lora_path(name, settings) / "pytorch_lora_weights.safetensors"))
        for name in ("sd3-lora-a", "sd3-lora-b")
    )
    gen = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(n):
        ga, gb = (torch.rand(2, generator=gen) * 2 - 1).tolist()
        path = into / f"lora-{i:04d}.safetensors"
        safetensors.torch.save_file({k: (ga * a[k] + gb * b[k]).contiguous() for k in a}, str(path))
        paths.append(path)
    return paths


def stream(args: argparse.Namespace) -> list[tuple[float, int]]:
    """(arrival time in s, LoRA index) of each request: Poisson arrivals, Zipf popularity."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    weights = 1.0 / np.arange(1, args.loras + 1) ** args.zipf
    picks = rng.choice(args.loras, size=args.requests, p=weights / weights.sum())
    arrivals = np.cumsum(rng.exponential(1.0 / args.rate, size=args.requests))
    return [(float(t), int(i)) for t, i in zip(arrivals, picks, strict=True)]


def run_stream(requests, paths, host, device, args: argparse.Namespace, prefetch: bool) -> dict:
    """Replay the stream in real time; per request: added latency, whether each cache had it.
    Without `prefetch` (the preloaded run) each request's adapter is put in the network, untimed,
    just before its turn: what it finds is what a network holding every LoRA would give it."""
    keys = [p.stem for p in paths]
    start = time.perf_counter() + 0.2

    def hints() -> None:  # the gateway's prefetch at planning time
        for t, i in requests:
            time.sleep(max(0.0, start + t - time.perf_counter()))
            host.prefetch(keys[i], paths[i])

    hinter = threading.Thread(target=hints, daemon=True)
    if prefetch:
        hinter.start()
    reads_before = reads.value
    added, device_hits, hidden = [], 0, 0
    for t, i in requests:  # the compute thread
        ready = start + t + args.encode_ms / 1000  # prompt encoded
        time.sleep(max(0.0, ready - time.perf_counter()))
        key = keys[i]
        if not prefetch:
            device.activate_now([(key, 1.0)], lambda k: host.get(k, paths[keys.index(k)]))
            device.deactivate()
        t0 = time.perf_counter()
        with host.holding([key]):
            hidden += key in host.keys()
            host.get(key, paths[i])
            device_hits += key in device.loaded()
            device.activate_now([(key, 1.0)], lambda k: host.get(k, paths[keys.index(k)]))
            added.append(time.perf_counter() - t0)
            time.sleep(args.denoise_ms / 1000)  # the loop itself
            device.deactivate()
    if prefetch:
        hinter.join(timeout=5)
    added.sort()
    return {
        "added_p50_ms": 1000 * statistics.median(added),
        "added_p99_ms": 1000 * added[min(len(added) - 1, int(0.99 * len(added)))],
        "host_hit_rate": 1 - (reads.value - reads_before) / len(requests),  # no file read for it
        "read_hidden_rate": hidden / len(requests),  # read (or cached) before its step came
        "device_hit_rate": device_hits / len(requests),
        "host_bytes": host.total_bytes(),
        "device_bytes": device.total_bytes(),
    }


class Reads:
    """Counts the files the host cache reads (each a miss: the file was not in memory)."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def __call__(self, path):
        from services.denoiser.lora_host import read_lora

        with self._lock:
            self.value += 1
        return read_lora(path)


reads = Reads()


def tiny_runs(args: argparse.Namespace, settings: Settings, tmp: Path) -> dict:
    from services.denoiser.lora import LoraCache
    from services.denoiser.lora_host import HostLoraCache, read_lora
    from shared.zoo import load_denoiser

    t = time.perf_counter()
    paths = write_loras(args.loras, settings, tmp, args.seed)
    print(f"wrote {len(paths)} LoRAs in {time.perf_counter() - t:.1f} s", flush=True)
    file_bytes = read_lora(paths[0]).nbytes
    total = file_bytes * len(paths)
    requests = stream(args)
    out = {"lora_bytes": file_bytes, "all_loras_bytes": total, "distinct_named": len({i for _, i in requests})}

    bundle = load_denoiser("sd3-transformer", settings)
    host = HostLoraCache(int(total * args.host_frac), read=reads)
    device = LoraCache(bundle.transformer, int(total * args.device_frac), max_adapters=args.device_adapters)
    out["on_demand"] = run_stream(requests, paths, host, device, args, prefetch=True)
    out["on_demand"] |= {"host_budget": host.max_bytes, "device_budget": device.max_bytes}
    print("on demand:", json.dumps(out["on_demand"]), flush=True)
    host.close()

    bundle = load_denoiser("sd3-transformer", settings)
    host = HostLoraCache(1 << 40, read=reads)
    device = LoraCache(bundle.transformer, 1 << 40, max_adapters=args.device_adapters)
    t = time.perf_counter()
    for p in paths:
        host.get(p.stem, p)
    out["preload_read_s"] = time.perf_counter() - t
    out["preloaded"] = run_stream(requests, paths, host, device, args, prefetch=False)
    print("preloaded:", json.dumps(out["preloaded"]), flush=True)
    host.close()
    return out


def full_size(args: argparse.Namespace, tmp: Path) -> dict:
    """Write two of SD3-Medium's rank-64 LoRAs (random bf16), read one cold, load it into the
    full-size MMDiT, then swap the two into each other's slot."""
    import torch

    from services.denoiser.lora import LoraCache
    from services.denoiser.lora_host import read_lora
    from shared.zoo.full_size import build_full_size

    base = build_full_size("sd3-transformer")  # meta: shapes only
    files = [_write_full_size_lora(base, tmp / f"sd3-medium-rank64-{i}.safetensors", args.seed + i) for i in range(2)]
    file = files[0]
    with open(file, "rb") as f:  # drop this file (only) from the page cache: a read from disk
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    t = time.perf_counter()
    tensors = read_lora(file)
    out = {"file_bytes": file.stat().st_size, "layers": len(tensors.state) // 2, "read_cold_s": time.perf_counter() - t}
    t = time.perf_counter()
    read_lora(file)
    out["read_warm_s"] = time.perf_counter() - t
    print("full-size read:", json.dumps(out), flush=True)
    if args.full_device:
        model = base.to(torch.bfloat16).to_empty(device="cpu")  # 2 B parameters, uninitialised: values do not matter
        sources = {"full-0": tensors, "full-1": read_lora(files[1])}
        cache = LoraCache(model, 1 << 40, max_adapters=1)  # full after one: the next LoRA is swapped in
        t = time.perf_counter()
        cache.activate_now([("full-0", 1.0)], sources.__getitem__)
        out["device_load_s"] = time.perf_counter() - t
        swaps = []
        for i in range(1, 6):  # the two LoRAs in turn, each swapped into the other's slot
            t = time.perf_counter()
            cache.activate_now([(f"full-{i % 2}", 1.0)], sources.__getitem__)
            swaps.append(time.perf_counter() - t)
        assert cache.counts["swap"] == len(swaps), cache.counts
        out["device_swap_s"] = statistics.median(swaps)
        print("full-size device load and swap:", json.dumps(out), flush=True)
    return out


def _write_full_size_lora(base: Any, file: Path, seed: int) -> Path:
    """SD3-Medium's rank-64 LoRA on every attention projection, random bf16 weights."""
    import safetensors.torch
    import torch

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(f".{t}") for t in SD3_TARGETS):
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(64, module.in_features, generator=gen).bfloat16()
            state[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, 64, generator=gen).bfloat16()
    safetensors.torch.save_file(state, str(file))
    return file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loras", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=12.0, help="requests per second (Poisson)")
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--encode-ms", type=float, default=30.0, help="text encoding: the time a prefetch can hide in")
    parser.add_argument("--denoise-ms", type=float, default=40.0, help="the loop, holding the compute thread")
    parser.add_argument("--host-frac", type=float, default=0.25, help="host cache budget, of all LoRAs' bytes")
    parser.add_argument("--device-frac", type=float, default=0.05, help="device cache budget, of all LoRAs' bytes")
    parser.add_argument("--device-adapters", type=int, default=16, help="and adapters (LEGO_LORA_CACHE_MAX_ADAPTERS)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-full-device", dest="full_device", action="store_false")
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    quiet_libraries()
    import torch

    torch.set_num_threads(1)
    settings = Settings.from_env()
    result: dict = {"args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="lego-bench-loras-") as tmp:
        if not args.skip_tiny:
            result["tiny"] = tiny_runs(args, settings, Path(tmp))
        result["full_size"] = full_size(args, Path(tmp))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loras.json").write_text(json.dumps(result, indent=2))
    print_table(result, args)


def print_table(result: dict, args: argparse.Namespace) -> None:
    print(
        f"\nLoRAs on demand, denoiser caches driven directly (no mesh), CPU: {args.loras} tiny SD3 LoRAs, "
        f"Zipf({args.zipf}), Poisson {args.rate}/s x {args.requests}, encode {args.encode_ms:g} ms, "
        f"denoise {args.denoise_ms:g} ms; host cache {args.host_frac:.0%} and device cache {args.device_frac:.0%} "
        f"of all LoRAs' bytes, device at most {args.device_adapters} adapters"
    )
    if "tiny" in result:
        tiny = result["tiny"]
        print(f"one tiny LoRA: {tiny['lora_bytes'] / 1024:.1f} KiB; named: {tiny['distinct_named']} distinct")
        print("| run | added p50 ms | added p99 ms | host hit | read hidden | device hit | host bytes | device bytes |")
        print("|---|---|---|---|---|---|---|---|")
        for name in ("on_demand", "preloaded"):
            r = tiny[name]
            print(
                f"| {name.replace('_', ' ')} | {r['added_p50_ms']:.2f} | {r['added_p99_ms']:.2f} | "
                f"{r['host_hit_rate']:.1%} | {r['read_hidden_rate']:.1%} | {r['device_hit_rate']:.1%} | "
                f"{r['host_bytes'] / 2**20:.2f} MiB | {r['device_bytes'] / 2**20:.2f} MiB |"
            )
    full = result["full_size"]
    line = (
        f"full-size SD3-Medium rank-64 LoRA ({full['layers']} layers, {full['file_bytes'] / 2**20:.0f} MiB bf16): "
        f"read from disk {full['read_cold_s']:.2f} s (page cache: {full['read_warm_s']:.2f} s)"
    )
    if "device_load_s" in full:
        line += f", into the transformer {full['device_load_s']:.2f} s (a new slot)"
        line += f", swapped into a full cache's slot {full['device_swap_s']:.3f} s"
    print(line)


if __name__ == "__main__":
    main()
