"""Requests a second one or two real gateways plan and complete over no-op models
(`bench/noop_service.py`): the whole request path (HTTP, API key, admission, planning, five
steps through JetStream, results, the images pulled over the tensor plane, PNG, the answer)
with the models' compute taken out. `bench/control_plane.py` runs it."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from bench.hop import ROOT, CpuMeter, percentile
from bench.profiled import cpu_breakdown
from lego.launcher import Child, Mesh, MeshConfig, Unit, free_port
from shared import bus_roles

PROFILE = bool(os.environ.get("CPLANE_PROFILE"))
BODY = {
    "prompt": "a lighthouse on a cliff at dawn, oil painting",
    "workflow": "sd3",
    "size": "1024x1024",
    "num_inference_steps": 28,
    "response_format": "b64_json",
}


class NoopMesh(Mesh):
    """The mesh of the sd3 workflow with every model replaced by a no-op replica."""

    def replica_command(self, unit: Unit) -> list[str]:
        return [sys.executable, "-m", "bench.noop_service", "--models", ",".join(unit.models)]

    def _prepare_models(self) -> None:
        pass  # no weights to build

    def add_gateway(self, name: str, port: int, auth: bool) -> Child:
        """`Mesh.add_gateway`, under bench/profiled.py when CPLANE_PROFILE is set."""
        if not PROFILE:
            return super().add_gateway(name, port, auth)
        assert self.config.log_dir is not None
        argv = [sys.executable, "-m", "bench.profiled", str(self.config.log_dir / f"{name}.prof")]
        argv += ["services.gateway", "--host", self.config.host, "--port", str(port)]
        gateway = Child(name, argv, {**self._env(bus_roles.GATEWAY), **self.auth_env(auth)}, self._log_path(name))
        gateway.start()
        self.children.append(gateway)
        return gateway


@dataclass
class GatewayRun:
    gateways: int
    in_flight: int  # clients, each with one request at a time, spread evenly over the gateways
    seconds: float
    requests: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_ms_per_request: dict[str, float] = field(default_factory=dict)  # gateway(s), nats-server, replicas, client


async def wait_ready(session: aiohttp.ClientSession, url: str, timeout_s: float = 120.0) -> None:
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        try:
            async with session.get(f"{url}/readyz", params={"workflow": "sd3"}) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError(f"gateway {url} not ready within {timeout_s:.0f}s")


async def load(
    session: aiohttp.ClientSession, urls: list[str], key: str, in_flight: int, warmup_s: float, seconds: float
) -> tuple[list[float], int, int]:
    """Closed loop: `in_flight` clients, client i on gateway i mod N. Returns the latencies of
    requests answered inside the window, the errors there, and every request answered."""
    loop = asyncio.get_running_loop()
    begin = loop.time() + warmup_s
    end = begin + seconds
    kept: list[float] = []
    errors, answered = [0], [0]
    headers = {"Authorization": f"Bearer {key}"}

    async def client(url: str) -> None:
        while loop.time() < end:
            t0 = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/images/generations", json=BODY, headers=headers) as resp:
                    body = await resp.json()
                    ok = resp.status == 200 and len(body.get("data", [])) == 1
                    why = f"gateway answered {resp.status}: {str(body)[:200]}"
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                ok, why = False, f"request failed: {type(exc).__name__}: {exc}"
            answered[0] += ok
            if begin <= loop.time() <= end:
                if ok:
                    kept.append(time.perf_counter() - t0)
                else:
                    errors[0] += 1
            if not ok:
                print(why, file=sys.stderr)
                await asyncio.sleep(0.1)

    await asyncio.gather(*(client(urls[i % len(urls)]) for i in range(in_flight)))
    return kept, errors[0], answered[0]


async def measure(mesh: Mesh, urls: list[str], key: str, in_flight: int, seconds: float) -> GatewayRun:
    gateways = [c for c in mesh.children if c.name.startswith("gateway")]
    replicas = [c for c in mesh.children if c.unit]
    assert mesh.nats is not None
    meter = CpuMeter(
        {
            "gateway": [c.pid for c in gateways],
            "nats-server": [mesh.nats.pid],
            "replicas": [c.pid for c in replicas],
            "client": [os.getpid()],
        }
    )
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        for url in urls:
            await wait_ready(session, url)
        await load(session, urls, key, min(in_flight, 4), 0.0, 1.0)  # warm: connections, code paths
        meter.start()
        kept, errors, answered = await load(session, urls, key, in_flight, min(1.0, seconds / 4), seconds)
        meter.stop()
    done = max(1, answered)  # the meter ran over the whole loaded stretch, warm-up included
    return GatewayRun(
        gateways=len(urls),
        in_flight=in_flight,
        seconds=seconds,
        requests=len(kept),
        requests_per_s=len(kept) / seconds,
        p50_ms=percentile(kept, 0.5) * 1e3,
        p99_ms=percentile(kept, 0.99) * 1e3,
        errors=errors,
        cpu_ms_per_request={name: round(used / done * 1e3, 3) for name, used in meter.used.items()},
    )


async def run_gateways(gateway_counts: list[int], in_flight_per_gateway: int, seconds: float) -> list[dict]:
    """One no-op mesh (nats-server, a no-op replica per unit, one gateway), a second gateway added
    for the 2-gateway run."""
    workdir = Path(tempfile.mkdtemp(prefix="lego-cplane-gw-"))
    env = {
        "PYTHONPATH": str(ROOT),
        "LEGO_STATE_DIR": str(workdir / "state"),
        "LEGO_INLINE_MAX_BYTES": "0",  # every tensor goes over the tensor plane, as full-size ones do
        "LEGO_LOG_LEVEL": "WARNING",
    }
    mesh = NoopMesh(MeshConfig(port=free_port(), workflows=["sd3"], env=env, log_dir=workdir, quiet=True))
    out = []
    try:
        await asyncio.to_thread(mesh.start, 180.0)
        assert mesh.admin_key_file is not None
        key = mesh.admin_key_file.read_text().strip()
        urls = [mesh.url]
        for count in sorted(gateway_counts):
            while len(urls) < count:
                port = free_port()
                mesh.add_gateway(f"gateway-{len(urls) + 1}", port, auth=True)
                urls.append(f"http://{mesh.config.host}:{port}")
            run = await measure(mesh, urls, key, in_flight_per_gateway * count, seconds)
            out.append(asdict(run))
    finally:
        await asyncio.to_thread(mesh.stop)
        if not PROFILE:
            shutil.rmtree(workdir, ignore_errors=True)
    if PROFILE and out:  # written as the gateways exited: over every run of this mesh
        out[-1]["profiles"] = {p.name: cpu_breakdown(str(p)) for p in sorted(workdir.glob("gateway*.prof"))}
    return out
