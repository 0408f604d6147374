"""The step hop alone: a gateway's publish of a step through JetStream to no-op replicas and its
result back (`bench/noop_steps.py` holds the replicas), as steps/s under load and round-trip
latency, with the CPU each process spent per step. `bench/control_plane.py` runs it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
from nats.aio.msg import Msg
from nats.errors import NoRespondersError

from bench.noop_steps import ECHO_SUBJECT, KIND, noop_step
from lego.processes import Child, start_nats_server, wait_gone
from shared import subjects
from shared.bus import Bus
from shared.messages import StepResult
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PROFILE = bool(os.environ.get("CPLANE_PROFILE"))
READY_TIMEOUT_S = 90.0  # replica processes starting on a loaded 2-core box


@dataclass
class HopRun:
    """One measurement: `replicas` no-op replicas in `processes` processes, `in_flight` steps kept
    in flight by one driver (one gateway's connection) for `seconds`."""

    replicas: int
    processes: int
    in_flight: int
    seconds: float
    steps: int
    steps_per_s: float
    p50_ms: float
    p99_ms: float
    solo_steps: int  # then one step at a time: the hop's own latency, no queue in front of it
    solo_p50_ms: float
    solo_p99_ms: float
    published: int  # every step the driver published (warm-up and solo runs included) ...
    results: int  # ... every result it received ...
    delivered: int  # ... and what JetStream counted: deliveries by the step consumers
    acked_all: bool  # no step left pending or unacked in the consumers at the end
    cpu_ms_per_step: dict[str, float] = field(default_factory=dict)  # by process: driver, nats-server, replicas


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Driver:
    """Publishes steps as the gateway's orchestrator does (`Bus.publish_step`) and collects their
    results on its result subject (`Bus.subscribe_results`)."""

    def __init__(self, bus: Bus, model_id: str) -> None:
        self.bus = bus
        self.model_id = model_id
        self.gateway_id = f"bench-{uuid.uuid4().hex[:8]}"
        self.reply_to = subjects.result_subject(self.gateway_id)
        self.pending: dict[str, asyncio.Future[None]] = {}
        self.published = 0
        self.results = 0
        self._n = 0

    async def start(self) -> None:
        await self.bus.subscribe_results(self.gateway_id, self._on_result)

    async def _on_result(self, result: StepResult) -> None:
        self.results += 1
        future = self.pending.pop(result.request_id, None)
        if future is not None and not future.done():
            future.set_result(None)

    async def one(self) -> float:
        """Seconds from publishing one step to holding its result."""
        self._n += 1
        request_id = f"{self.gateway_id}-{self._n}"
        step = noop_step(request_id, self.model_id, self.reply_to)  # the gateway builds it before it publishes
        future = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        t0 = time.perf_counter()
        await self.bus.publish_step(step)
        self.published += 1
        async with asyncio.timeout(30.0):  # not wait_for: it would wake us a loop turn after the result
            await future
        return time.perf_counter() - t0

    async def closed_loop(self, in_flight: int, warmup_s: float, seconds: float) -> tuple[list[float], int]:
        """`in_flight` steps kept in flight: the latencies of those finished inside the window,
        and how many finished in all (warm-up included)."""
        loop = asyncio.get_running_loop()
        begin = loop.time() + warmup_s
        end = begin + seconds
        kept: list[float] = []
        done = [0]

        async def client() -> None:
            while loop.time() < end:
                latency = await self.one()
                done[0] += 1
                if begin <= loop.time() <= end:
                    kept.append(latency)

        await asyncio.gather(*(client() for _ in range(in_flight)))
        return kept, done[0]


class CpuMeter:
    """CPU seconds (user + system) of some processes between `start()` and `stop()`."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = {name: [psutil.Process(pid) for pid in pids] for name, pids in groups.items()}
        self._at: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        out = {}
        for name, procs in self.groups.items():
            total = 0.0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system + t.children_user + t.children_system
            out[name] = total
        return out

    def start(self) -> None:
        self._at = self._now()

    def stop(self) -> None:
        now = self._now()
        self.used = {name: now[name] - self._at[name] for name in now}


def start_replicas(nats_url: str, model_id: str, replicas: int, processes: int, log_dir: Path) -> list[Child]:
    """`replicas` no-op replicas spread over `processes` processes, each in its own process group."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    children = []
    for i in range(processes):
        count = replicas // processes + (1 if i < replicas % processes else 0)
        profile = ["-m", "bench.profiled", str(log_dir / f"{model_id}-{i}.prof")] if PROFILE else ["-m"]
        argv = [sys.executable, *profile, "bench.noop_steps", "--nats-url", nats_url, "--model", model_id]
        child = Child(f"noop-{model_id}-{i}", [*argv, "--replicas", str(count)], env, log_dir / f"{model_id}-{i}.log")
        child.start()
        children.append(child)
    return children


def stop_children(children: list[Child]) -> None:
    for child in children:
        child.signal_group(signal.SIGTERM)
    wait_gone(children, 10.0)
    for child in children:
        child.signal_group(signal.SIGKILL)
        if child.proc is not None:
            with contextlib.suppress(Exception):
                child.proc.wait(timeout=5)


async def wait_consuming(bus: Bus, model_id: str, replicas: int, children: list[Child]) -> None:
    """Until every replica has a pull waiting on the model's normal band (its consume loop runs)."""
    durable = await bus.ensure_consumer(KIND, model_id)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + READY_TIMEOUT_S
    while True:
        dead = [c.name for c in children if not c.alive()]
        if dead:
            raise RuntimeError(f"no-op replica processes exited at start: {dead} (see their logs)")
        info = await bus.js.consumer_info(subjects.STEP_STREAM, durable)
        if (info.num_waiting or 0) >= replicas:
            return
        if loop.time() > give_up:
            raise TimeoutError(f"{info.num_waiting} of {replicas} no-op replicas consuming after {READY_TIMEOUT_S}s")
        await asyncio.sleep(0.1)


async def consumer_counts(bus: Bus, model_id: str) -> tuple[int, bool]:
    """(deliveries, nothing pending or unacked) over the model's band consumers."""
    delivered, clear = 0, True
    for band in subjects.BAND_NAMES:
        info = await bus.js.consumer_info(subjects.STEP_STREAM, subjects.consumer_name(KIND, model_id, band))
        delivered += info.delivered.consumer_seq or 0 if info.delivered else 0
        clear = clear and not info.num_pending and not info.num_ack_pending
    return delivered, clear


async def measure(
    bus: Bus,
    nats: Child,
    replicas: int,
    processes: int,
    in_flight: int,
    seconds: float,
    solo_steps: int,
    log_dir: Path,
) -> HopRun:
    """One configuration, with replica processes of its own (a model id of its own, so its
    consumers count only its steps)."""
    model_id = f"noop-{replicas}-{uuid.uuid4().hex[:4]}"
    children = start_replicas(bus.settings.nats_url, model_id, replicas, processes, log_dir)
    try:
        await wait_consuming(bus, model_id, replicas, children)
        driver = Driver(bus, model_id)
        await driver.start()
        meter = CpuMeter({"driver": [os.getpid()], "nats-server": [nats.pid], "replicas": [c.pid for c in children]})
        for _ in range(20):  # connections and code paths warm
            await driver.one()
        meter.start()
        loaded, done = await driver.closed_loop(in_flight, warmup_s=min(1.0, seconds / 4), seconds=seconds)
        meter.stop()
        solo = [await driver.one() for _ in range(solo_steps)]
        await asyncio.sleep(0.2)  # the last acks reach the server
        delivered, clear = await consumer_counts(bus, model_id)
    finally:
        stop_children(children)
    return HopRun(
        replicas=replicas,
        processes=processes,
        in_flight=in_flight,
        seconds=seconds,
        steps=len(loaded),
        steps_per_s=len(loaded) / seconds,
        p50_ms=statistics.median(loaded) * 1e3 if loaded else float("nan"),
        p99_ms=percentile(loaded, 0.99) * 1e3,
        solo_steps=len(solo),
        solo_p50_ms=statistics.median(solo) * 1e3 if solo else float("nan"),
        solo_p99_ms=percentile(solo, 0.99) * 1e3,
        published=driver.published,
        results=driver.results,
        delivered=delivered,
        acked_all=clear,
        cpu_ms_per_step={name: round(used / max(1, done) * 1e3, 3) for name, used in meter.used.items()},
    )


async def echo_floor(bus: Bus, rounds: int, log_dir: Path) -> dict[str, float]:
    """p50/p99 of a bare core-NATS request / reply to another Python process (no JetStream, no
    parsing): the least any hop through this nats-server costs on this box now."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "bench.noop_steps", "--nats-url", bus.settings.nats_url, "--echo"]
    child = Child("echo", argv, env, log_dir / "echo.log")
    child.start()
    try:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + READY_TIMEOUT_S
        while True:  # until the echo process answers
            try:
                await bus.nc.request(ECHO_SUBJECT, b"ping", timeout=0.5)
                break
            except (TimeoutError, NoRespondersError):
                if loop.time() > give_up or not child.alive():
                    raise RuntimeError("the echo process never answered") from None
                await asyncio.sleep(0.1)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            await bus.nc.request(ECHO_SUBJECT, b"x" * 1024, timeout=5)
            times.append(time.perf_counter() - t0)
    finally:
        stop_children([child])
    return {"rounds": rounds, "p50_ms": statistics.median(times) * 1e3, "p99_ms": percentile(times, 0.99) * 1e3}


async def js_floor(bus: Bus, rounds: int, log_dir: Path) -> dict[str, float]:
    """p50/p99 of a bare JetStream step hop (`bench.noop_steps --js-echo`): publish with ack, a
    pull, a result published with ack, an ordered push consumer back; no parsing or bands. What
    the step hop would cost here if our own code cost nothing."""
    model_id = f"js-floor-{uuid.uuid4().hex[:4]}"
    reply = subjects.result_subject(f"js-floor-{uuid.uuid4().hex[:6]}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "bench.noop_steps", "--nats-url", bus.settings.nats_url, "--js-echo"]
    child = Child("js-echo", [*argv, "--model", model_id], env, log_dir / "js-echo.log")
    child.start()
    waiting: list[asyncio.Future[None]] = []

    async def back(msg: Msg) -> None:
        if waiting and not waiting[0].done():
            waiting[0].set_result(None)

    sub = await bus.js.subscribe(reply, cb=back, ordered_consumer=True)
    try:
        await wait_consuming(bus, model_id, 1, [child])
        subject = subjects.step_subject(KIND, model_id)
        times = []
        for i in range(rounds + 20):
            waiting[:] = [asyncio.get_running_loop().create_future()]
            t0 = time.perf_counter()
            await bus.publish_acked(subject, reply.encode(), {"Nats-Msg-Id": f"{model_id}-{i}"})
            await asyncio.wait_for(waiting[0], 30)
            if i >= 20:  # the first ones warm the paths
                times.append(time.perf_counter() - t0)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        stop_children([child])
    return {"rounds": rounds, "p50_ms": statistics.median(times) * 1e3, "p99_ms": percentile(times, 0.99) * 1e3}


async def run_hops(
    replica_counts: list[int],
    seconds: float,
    in_flight: int,
    solo_steps: int,
    max_processes: int = 0,
) -> list[dict]:
    """A nats-server of our own (JetStream, file storage), then each replica count in turn.
    `max_processes`: 0 = one process per replica, as the mesh runs them; else at most this many."""
    workdir = Path(tempfile.mkdtemp(prefix="lego-cplane-"))
    nats, url = start_nats_server(workdir / "jetstream", workdir / "nats.log")
    bus = Bus(Settings.from_env(nats_url=url), name="control-plane-driver")
    try:
        await bus.connect()
        await bus.ensure_streams()
        floor = await echo_floor(bus, max(50, solo_steps), workdir)
        bare_js = await js_floor(bus, max(50, solo_steps), workdir)
        out = []
        for replicas in replica_counts:
            processes = replicas if max_processes <= 0 else min(replicas, max_processes)
            run = await measure(bus, nats, replicas, processes, in_flight, seconds, solo_steps, workdir)
            out.append({**asdict(run), "echo_floor": floor, "js_floor": bare_js})
        return out
    finally:
        await bus.close()
        stop_children([nats])
        if PROFILE:
            print(f"no-op replica profiles in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
