"""Tensor-plane throughput per transport against the raw same-host limit, 1 MiB .. 1 GiB.

The producer is a separate process (as in the mesh) holding one tensor per size; this process is
the consumer and times `plane.get(ref)` until it holds the bytes in its own memory (for shm, the
zero-copy mapping plus one touch per page, so the mapping is resident as a copy would be).
Limits, measured the same way (fresh destination buffer each time) and in alternation with the
transfers (limit, transfer, limit, ...), so both see the same load on a shared machine:
  inline, shm  a plain memcpy in one process (numpy copy of the tensor)
  tcp, ucx     a raw loopback socket from another process (sendall -> recv_into); UCX runs over
               TCP on a machine without GPU
  ucx-cuda     (--device cuda) `put_tensor`/`get_tensor` of a CUDA tensor, device to device over
               UCX (cuda_ipc on one host), against a device-to-device copy
  shm-cuda     (--device cuda) the same CUDA tensor through host shared memory (device -> host
               at put, map + host -> device at get), against the same limit: the same-host
               alternative to CUDA IPC
Inline is measured up to 64 MiB for completeness but is not a bulk transport (the bus caps a
message at 1 MB; inline_max_bytes is 64 KiB), so it is left out of the worst ratio.

Prints a table; writes everything to bench/results/tensor_plane.json; the last line is the
worst ratio achieved/limit at 64 MiB over the bulk transports (goal >= 0.8).

    python bench/tensor_plane.py [--sizes 1 4 16 64 256 1024] [--repeats 7] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.messages import TensorRef  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.tensor_plane import RawTensor, TensorPlane  # noqa: E402
from shared.tensor_plane.shm import shm_supported  # noqa: E402
from shared.tensor_plane.ucx import ucx_installed  # noqa: E402

MiB = 1 << 20
INLINE_MAX_MIB = 64
BULK = ("shm", "tcp", "ucx", "ucx-cuda", "shm-cuda")
PAGE = 4096
WARMUP = 3


# -- producer process ------------------------------------------------------------------------------


async def serve(transport: str, sizes: list[int], device: str) -> None:
    """Put one tensor per size, print the refs (one JSON line), hold them until stdin closes."""
    inline = transport == "inline"
    settings = Settings(
        transport="auto" if inline else transport.removesuffix("-cuda"),
        inline_max_bytes=(max(sizes) * MiB if inline else 0),
        tensor_ttl_s=3600,
    )
    async with TensorPlane(settings) as plane:
        refs = []
        for mib in sizes:
            data = np.random.default_rng(mib).integers(0, 255, mib * MiB, dtype=np.uint8)
            if transport.endswith("-cuda"):
                import torch

                refs.append(plane.put_tensor(torch.from_numpy(data).to(device), owner="bench"))
            else:
                refs.append(plane.put(RawTensor.from_numpy(data), owner="bench"))
            del data
        print(json.dumps([r.model_dump(mode="json") for r in refs]), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def raw_sender(port: int, nbytes: int) -> None:
    """The raw-socket limit's producer: send `nbytes` for each byte received, until EOF."""
    data = np.ones(nbytes, dtype=np.uint8)
    with socket.create_connection(("127.0.0.1", port)) as s:
        while s.recv(1):
            s.sendall(data)


# -- measurements ----------------------------------------------------------------------------------


def touch(buf: Any) -> None:
    """Read one byte per page, so a lazily mapped buffer is resident (a no-op cost otherwise)."""
    arr = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf.reshape(-1).view(np.uint8)
    int(arr[::PAGE].sum())


class MemcpyLimit:
    """A plain memcpy into a fresh buffer (numpy copy), in this process."""

    def __init__(self, nbytes: int, device: str) -> None:
        self.src = np.ones(nbytes, dtype=np.uint8)

    def run(self) -> float:
        t0 = time.perf_counter()
        dst = self.src.copy()
        dt = time.perf_counter() - t0
        del dst
        return dt

    def close(self) -> None:
        del self.src


class SocketLimit:
    """A raw loopback socket from another process: sendall there, recv_into a fresh buffer here."""

    def __init__(self, nbytes: int, device: str) -> None:
        self.nbytes = nbytes
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            port = listener.getsockname()[1]
            self.proc = subprocess.Popen([sys.executable, __file__, "--raw-sender", str(port), str(nbytes)], cwd=ROOT)
            self.conn, _ = listener.accept()

    def run(self) -> float:
        t0 = time.perf_counter()
        dst = np.empty(self.nbytes, dtype=np.uint8)
        view, got = memoryview(dst), 0
        self.conn.sendall(b"x")
        while got < self.nbytes:
            n = self.conn.recv_into(view[got:])
            if not n:
                raise ConnectionError("raw sender went away")
            got += n
        dt = time.perf_counter() - t0
        del view, dst
        return dt

    def close(self) -> None:
        self.conn.close()
        self.proc.wait(timeout=30)


class DeviceCopyLimit:
    """A device-to-device copy into a fresh buffer on the GPU."""

    def __init__(self, nbytes: int, device: str) -> None:
        import torch

        self.torch = torch
        self.src = torch.ones(nbytes, dtype=torch.uint8, device=device)

    def run(self) -> float:
        self.torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst = self.torch.empty_like(self.src).copy_(self.src)
        self.torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        del dst
        return dt

    def close(self) -> None:
        del self.src


LIMITS = {"memcpy": MemcpyLimit, "socket": SocketLimit, "d2d": DeviceCopyLimit}
LIMIT_OF = {"inline": "memcpy", "shm": "memcpy", "tcp": "socket", "ucx": "socket", "ucx-cuda": "d2d", "shm-cuda": "d2d"}


async def paired(get: Callable[[], Awaitable[Any]], limit: Any, repeats: int) -> tuple[list[float], list[float]]:
    """Alternate one limit run and one transfer, so both see the same machine (this box is shared).

    Each side is timed until it holds its bytes; dropping them afterwards (munmap of a 64 MiB
    mapping or buffer: about a millisecond) is outside the timing on both sides."""
    for _ in range(WARMUP):  # connections, first mappings, TCP buffer autotuning
        limit.run()
        await get()
    ts, lts = [], []
    for _ in range(repeats):
        lts.append(limit.run())
        t0 = time.perf_counter()
        held = await get()
        ts.append(time.perf_counter() - t0)
        del held  # freeing what was received is not part of receiving it (nor is it for the limits)
    return ts, lts


async def measure_transport(
    transport: str, sizes: list[int], repeats: int, device: str
) -> dict[int, tuple[list[float], list[float]]]:
    """Per size: (the transport's times, its limit's times), measured in alternation."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve",
        transport,
        "--device",
        device,
        "--sizes",
        *map(str, sizes),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        limit=2 * max(sizes) * MiB + (1 << 20),  # inline refs carry base64 of the tensor
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 600)
        refs = [TensorRef.model_validate(r) for r in json.loads(line)]
        settings = Settings(transport="auto" if transport == "inline" else transport.removesuffix("-cuda"))
        results: dict[int, tuple[list[float], list[float]]] = {}
        async with TensorPlane(settings) as plane:
            for mib, ref in zip(sizes, refs, strict=True):
                if transport.endswith("-cuda"):
                    import torch

                    async def get(ref: TensorRef = ref) -> Any:
                        t = await plane.get_tensor(ref, device=device)
                        torch.cuda.synchronize()
                        return t
                else:

                    async def get(ref: TensorRef = ref) -> Any:
                        raw = await plane.get(ref)
                        touch(raw.buffer())
                        return raw

                limit = LIMITS[LIMIT_OF[transport]](mib * MiB, device)
                try:
                    results[mib] = await paired(get, limit, repeats)
                finally:
                    limit.close()
                gbps = mib * MiB / statistics.median(results[mib][0]) / 1e9
                print(f"  {transport:8s} {mib:5d} MiB  {gbps:6.2f} GB/s")
        return results
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()


# -- main --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024], help="MiB")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--transports", nargs="+", default=["inline", "shm", "tcp", "ucx"])
    parser.add_argument("--device", default="cpu", help="cuda: add the ucx-cuda and shm-cuda rows")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--raw-sender", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.sizes, args.device))
        return
    if args.raw_sender:
        raw_sender(*args.raw_sender)
        return

    transports = list(args.transports)
    if "shm" in transports and not shm_supported():
        transports.remove("shm")
    if "ucx" in transports and not ucx_installed():
        print("ucx: not installed (pip install '.[ucx]'), skipped")
        transports.remove("ucx")
    if args.device.startswith("cuda") and ucx_installed():
        transports.append("ucx-cuda")
    if args.device.startswith("cuda") and shm_supported():
        transports.append("shm-cuda")

    load_before = os.getloadavg()[0]
    print(f"measuring {', '.join(transports)} at {args.sizes} MiB, {args.repeats} repeats")
    rows: list[dict[str, Any]] = []
    for transport in transports:
        sizes = [s for s in args.sizes if transport != "inline" or s <= INLINE_MAX_MIB]
        times = asyncio.run(measure_transport(transport, sizes, args.repeats, args.device))
        for mib, (ts, limit_ts) in times.items():
            achieved = mib * MiB / statistics.median(ts)
            limit = mib * MiB / statistics.median(limit_ts)
            rows.append(
                {
                    "transport": transport,
                    "mib": mib,
                    "achieved_gbps": achieved / 1e9,
                    "best_gbps": mib * MiB / min(ts) / 1e9,
                    "limit": LIMIT_OF[transport],
                    "limit_gbps": limit / 1e9,
                    "ratio": achieved / limit,
                    "ratio_best": min(limit_ts) / min(ts),
                    "times_s": ts,
                    "limit_times_s": limit_ts,
                }
            )

    print()
    print("medians of alternated runs; 'best' is the ratio of the fastest runs")
    print(f"{'transport':10s} {'size':>9s} {'achieved':>10s} {'limit':>22s} {'ratio':>6s} {'best':>5s}")
    for r in rows:
        size = f"{r['mib']} MiB" if r["mib"] < 1024 else f"{r['mib'] // 1024} GiB"
        limit = f"{r['limit_gbps']:.2f} GB/s ({r['limit']})"
        ratios = f"{r['ratio']:6.2f} {r['ratio_best']:5.2f}"
        print(f"{r['transport']:10s} {size:>9s} {r['achieved_gbps']:6.2f} GB/s {limit:>22s} {ratios}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load = (load_before, os.getloadavg()[0])
    print(f"1-min load average before/after: {load[0]:.2f} / {load[1]:.2f} on {os.cpu_count()} CPUs")
    meta = {"cpus": os.cpu_count(), "device": args.device, "repeats": args.repeats, "loadavg": load}
    meta["UCX_TLS"] = os.environ.get("UCX_TLS")
    (out / "tensor_plane.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    at64 = [r for r in rows if r["mib"] == 64 and r["transport"] in BULK]
    if at64:
        worst = min(at64, key=lambda r: r["ratio"])
        print(f"worst ratio achieved/limit at 64 MiB (bulk transports): {worst['ratio']:.2f} ({worst['transport']})")


if __name__ == "__main__":
    main()
