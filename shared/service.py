"""The runtime every model service shares: settings -> load models -> consume steps -> results.

A service only supplies `ModelRunner`s (which model, which step kind, and a plain function
from input tensors to output tensors). Everything else — bus, tensor plane, presence, worker
loop, compute off the event loop, graceful stop on SIGTERM — lives here once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from shared import metrics, tracing
from shared.bus import Bus
from shared.logs import setup_logging
from shared.messages import ReplicaInfo, StepKind, StepProgress, StepRequest, StepResult, TensorRef
from shared.presence import announce_forever, process_rss_bytes
from shared.remote_steps import RemoteSteps
from shared.settings import Settings
from shared.tensor_plane import RawTensor, TensorPlane, TensorUnavailable
from shared.tensor_plane.plane import TRANSPORTS
from shared.worker import CancelledRuns, InputLost, StepWorker

log = logging.getLogger("lego.service")

ProgressFn = Callable[[int, int], None]


@dataclass
class StepContext:
    """What a runner may use besides its inputs: progress reports and steps of other models."""

    progress: ProgressFn
    remote: RemoteSteps
    plane: TensorPlane
    should_stop: Callable[[], bool] = lambda: False  # true once the step's request is cancelled


class ModelRunner(Protocol):
    """One loaded model and the plain functions that run steps on it (one per step kind)."""

    kinds: tuple[StepKind | str, ...]  # a kind of its own, outside StepKind, is any subject token
    model_id: str

    def run(self, step: StepRequest, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        """Compute on torch tensors; raise `BadStepInput` for input no replica could serve."""
        ...

    def warm_up(self) -> None:
        """One small call at start: the first real request should not pay one-time kernel setup."""
        ...

    def status(self) -> dict[str, Any]:
        """Live facts for the presence bucket: `param_bytes`, and `loras` where adapters load."""
        ...


def param_bytes(*modules: Any) -> int:
    """Bytes the parameters and buffers of torch modules take (what a loaded model costs)."""
    total = 0
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            total += t.numel() * t.element_size()
    return total


RunnerLoader = Callable[[str, Settings], ModelRunner]


@dataclass
class ServiceSpec:
    """What a service module declares: its name, default models and how to load one.
    `module`: what `python -m` runs it as, where that is not `services.<name>`."""

    name: str
    default_models: list[str]
    load: RunnerLoader
    description: str
    module: str = ""

    @property
    def entry_point(self) -> str:
        return self.module or f"services.{self.name}"


def parse_args(spec: ServiceSpec, argv: list[str] | None = None) -> tuple[Settings, list[str]]:
    parser = argparse.ArgumentParser(
        prog=f"python -m {spec.entry_point}",
        description=spec.description,
        epilog="Every flag also reads an environment variable (LEGO_NATS_URL, LEGO_DEVICE, ...).",
    )
    parser.add_argument(
        "--models",
        default=os.environ.get(f"LEGO_{spec.name.upper()}_MODELS", ",".join(spec.default_models)),
        help="comma-separated model ids this process hosts (default: %(default)s)",
    )
    parser.add_argument(
        "--nats-url", help="NATS server with JetStream (default: $LEGO_NATS_URL or nats://127.0.0.1:4222)"
    )
    parser.add_argument("--device", help="torch device (default: $LEGO_DEVICE or cpu)")
    parser.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="weights' dtype; auto: bfloat16 on a GPU, float32 on the CPU (default: $LEGO_DTYPE or auto)",
    )
    parser.add_argument("--models-dir", help="local diffusers SD3 directory; default: tiny seeded models")
    parser.add_argument("--transport", choices=list(TRANSPORTS), help="force one tensor transport (default: auto)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO)")
    args = parser.parse_args(argv)
    settings = Settings.from_env(
        nats_url=args.nats_url,
        device=args.device,
        dtype=args.dtype,
        models_dir=args.models_dir,
        transport=args.transport,
        log_level=args.log_level,
    )
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        parser.error("--models is empty: name at least one model id")
    return settings, models


def main(spec: ServiceSpec, argv: list[str] | None = None) -> None:
    settings, models = parse_args(spec, argv)
    setup_logging(spec.name, settings.log_level)
    tracing.setup(spec.name)  # on only where OTEL_* asks for it
    try:
        asyncio.run(serve(spec, settings, models))
    except KeyboardInterrupt:
        pass
    except ConnectionError as exc:  # no NATS / no JetStream: one clear line, not a traceback
        log.error("%s", exc)
        raise SystemExit(1) from None
    finally:
        tracing.shutdown()  # send the spans still batched


async def serve(spec: ServiceSpec, settings: Settings, model_ids: list[str]) -> None:
    """Run until SIGTERM/SIGINT; the step in hand is finished and acked before exit."""
    import torch

    from shared.tensor_plane.torch_codec import resolve_device

    settings.device = resolve_device(settings.device)  # "auto": cuda when torch sees a GPU
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    replica_id = f"{spec.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}".replace(".", "-")
    # One compute thread: torch work never runs on the event loop, and models in one process
    # take turns instead of fighting over the same cores.
    compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{spec.name}-compute")
    bus = Bus(settings, name=replica_id)
    await bus.connect()  # first: a missing NATS fails in seconds, not after loading models
    await bus.ensure_streams()
    t0 = time.perf_counter()
    runners = [await loop.run_in_executor(compute, spec.load, m, settings) for m in model_ids]
    for runner in runners:
        await loop.run_in_executor(compute, runner.warm_up)
    log.info("loaded %s in %.1fs", ",".join(model_ids), time.perf_counter() - t0)
    plane = TensorPlane(settings)
    await plane.start()
    metrics.watch_plane(plane)
    metrics.watch_models(runners, settings.device)
    metrics_server = metrics.MetricsServer()
    metrics_server.start(settings.tensor_bind, settings.metrics_port)
    cache = InputCache()

    def release(owner: str) -> None:
        plane.release(owner)
        cache.drop(owner)

    await bus.subscribe_release(release)
    cancelled = CancelledRuns()
    await bus.subscribe_cancel(cancelled.add)
    remote = RemoteSteps(bus, plane, replica_id)
    await remote.start()

    tasks = []
    for runner in runners:
        # A runner that batches (the denoiser's engine) takes several steps at once: each waits
        # on a thread of its own while the runner's engine thread computes them together.
        concurrency = getattr(runner, "concurrency", 1)
        waiters = compute
        if concurrency > 1:
            waiters = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"{runner.model_id}-steps")
        for kind in runner.kinds:
            handler = ModelStepHandler(runner, plane, bus, waiters, replica_id, remote, cache, cancelled)
            worker = StepWorker(
                bus, kind, runner.model_id, handler, replica_id, cancelled=cancelled, concurrency=concurrency
            )
            info = ReplicaInfo(
                replica_id=replica_id,
                kind=kind,
                model_id=runner.model_id,
                host=socket.gethostname(),
                pid=os.getpid(),
                device=settings.device,
                tensor_uri=plane.uri,
                started_at=time.time(),
                metrics_url=metrics_server.url(settings.tensor_host),
            )

            def describe(info: ReplicaInfo = info, worker: StepWorker = worker, runner: ModelRunner = runner):
                held = plane.stats["stored"]  # a property
                return info.model_copy(
                    update={
                        "busy": worker.busy,
                        "steps_done": worker.steps_done,
                        "tensors_held": held["count"],
                        "tensor_bytes_held": held["bytes"],
                        "seconds_per_item": worker.seconds_per_item,
                        "batch_size": worker.concurrency,
                        "rss_bytes": process_rss_bytes(),
                        **runner.status(),
                    }
                )

            tasks.append(asyncio.create_task(worker.run(stop)))
            tasks.append(asyncio.create_task(announce_forever(bus, describe, stop)))
    consumers = [(str(kind), r.model_id) for r in runners for kind in r.kinds]
    tasks.append(asyncio.create_task(metrics.sample_backlog(bus.consumer_backlog, consumers, stop)))
    log.info("ready replica=%s tensors=%s metrics=%s", replica_id, plane.uri, metrics_server.url(settings.tensor_host))
    await stop.wait()
    log.info("stopping: finishing the step in hand")
    await asyncio.gather(*tasks, return_exceptions=True)
    for runner in runners:
        close = getattr(runner, "close", None)
        if close is not None:
            close()
    await bus.close()
    await plane.close()
    metrics_server.stop()
    compute.shutdown(wait=False, cancel_futures=True)
    log.info("stopped")


class InputCache:
    """Inputs a step marks as constant for its request (`params["cache_inputs"]`), kept after
    the first pull. Why: a ControlNet is called at every denoising step with the same prompt
    embeddings and control latents; pulling them once per request, not once per step, saves
    a transfer per step. Refs are immutable (a key is never reused), so a hit is always right.
    Entries go when their request is released, or oldest first beyond `max_bytes`."""

    def __init__(self, max_bytes: int = 512 * 2**20) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[str, RawTensor]] = OrderedDict()
        self._bytes = 0

    def get(self, ref: TensorRef) -> RawTensor | None:
        entry = self._entries.get(ref.key)
        if entry is None:
            return None
        self._entries.move_to_end(ref.key)
        return entry[1]

    def put(self, ref: TensorRef, owner: str, raw: RawTensor) -> None:
        if ref.key in self._entries or raw.nbytes > self.max_bytes:
            return
        self._entries[ref.key] = (owner, raw)
        self._bytes += raw.nbytes
        while self._bytes > self.max_bytes:
            _, (_, old) = self._entries.popitem(last=False)
            self._bytes -= old.nbytes

    def drop(self, owner: str) -> None:
        for key in [k for k, (o, _) in self._entries.items() if o == owner]:
            self._bytes -= self._entries.pop(key)[1].nbytes


class ModelStepHandler:
    """Pulls a step's input tensors, runs the model off the loop, publishes outputs as refs."""

    def __init__(
        self,
        runner: ModelRunner,
        plane: TensorPlane,
        bus: Bus,
        compute: Executor,
        replica_id: str,
        remote: RemoteSteps | None = None,
        cache: InputCache | None = None,
        cancelled: CancelledRuns | None = None,
    ) -> None:
        self.runner = runner
        self.plane = plane
        self.bus = bus
        self.compute = compute
        self.replica_id = replica_id
        self.remote = remote if remote is not None else RemoteSteps(bus, plane, replica_id)
        self.cache = cache if cache is not None else InputCache()
        self.device = plane.settings.device
        self.cancelled = cancelled if cancelled is not None else CancelledRuns()

    def _context(self, step: StepRequest, loop: asyncio.AbstractEventLoop) -> StepContext:
        def progress(done: int, total: int) -> None:
            if step.progress_to:
                msg = StepProgress(
                    request_id=step.request_id, node_id=step.node_id, step=done, total=total, replica_id=self.replica_id
                )
                loop.call_soon_threadsafe(asyncio.ensure_future, self.bus.publish_progress(step.progress_to, msg))

        return StepContext(
            progress=progress,
            remote=self.remote,
            plane=self.plane,
            should_stop=lambda: step.request_id in self.cancelled,
        )

    async def _pull(self, step: StepRequest) -> dict[str, Any]:
        """Input tensors: RawTensors (host bytes), or torch tensors already on this service's
        GPU when the producer held them on a GPU (they then never touch host memory)."""
        cacheable = set(getattr(step.params, "cache_inputs", ()))
        raws: dict[str, Any] = {}
        lost, reason = [], ""
        for name, ref in step.inputs.items():
            cached = self.cache.get(ref) if name in cacheable else None
            if cached is not None:
                raws[name] = cached
                continue
            try:
                if ref.device != "cpu" and self.device != "cpu":
                    raws[name] = await self.plane.get_tensor(ref, device=self.device)
                    continue  # device tensors are not cached: the cache holds host bytes
                raws[name] = await self.plane.get(ref)
            except TensorUnavailable as exc:
                lost.append(name)
                reason = str(exc)
                continue
            if name in cacheable:
                self.cache.put(ref, step.request_id, raws[name])
        if lost:
            raise InputLost(lost, reason)
        return raws

    async def __call__(self, step: StepRequest) -> StepResult:
        import torch

        from shared.tensor_plane.torch_codec import from_raw, settle

        loop = asyncio.get_running_loop()
        raws = await self._pull(step)
        ctx = self._context(step, loop)
        device = self.device

        def compute() -> tuple[dict[str, TensorRef], float]:
            started, t0 = time.time(), time.perf_counter()
            # Inputs that came as host bytes (inline, shm, tcp) join the ones already on this GPU.
            inputs = {n: r if isinstance(r, torch.Tensor) else from_raw(r).to(device) for n, r in raws.items()}
            outputs = self.runner.run(step, inputs, ctx)
            settle(outputs.values())
            seconds = time.perf_counter() - t0
            # Recorded, not made current: steps this one publishes (ControlNet) stay children of the step.
            tracing.record("model.run", started, started + seconds)
            # put_tensor keeps a GPU output in device memory when the plane offers UCX.
            refs = {name: self.plane.put_tensor(t, owner=step.output_owner) for name, t in outputs.items()}
            return refs, seconds

        refs, seconds = await loop.run_in_executor(self.compute, tracing.carry(compute))  # spans nest in the step's
        return StepResult(
            request_id=step.request_id,
            node_id=step.node_id,
            attempt=step.attempt,
            ok=True,
            outputs=refs,
            replica_id=self.replica_id,
            compute_s=seconds,
        )
