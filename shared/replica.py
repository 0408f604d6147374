"""One model replica process from start to stop: connect, load the models, consume their
steps until SIGTERM / SIGINT, finish the step in hand, close everything it opened."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

from shared import metrics
from shared.bus import Bus
from shared.input_cache import InputCache
from shared.lifecycle import stop_on_signals
from shared.lora_registry import LoraRegistry
from shared.messages import ReplicaInfo, StepKind
from shared.model_runner import ModelRunner, ServiceSpec
from shared.presence import announce_forever, process_rss_bytes
from shared.remote_steps import RemoteSteps
from shared.settings import Settings
from shared.step_handler import ModelStepHandler
from shared.tensor_plane import TensorPlane
from shared.worker import CancelledRuns, StepWorker

log = logging.getLogger("lego.service")


async def serve(spec: ServiceSpec, settings: Settings, model_ids: list[str]) -> None:
    """Run until SIGTERM/SIGINT; the step in hand is finished and acked before exit."""
    configure_torch(settings)
    stop = stop_on_signals()
    replica = await Replica.start(spec, settings, model_ids)
    tasks = replica.consume(stop)
    log.info(
        "ready replica=%s tensors=%s metrics=%s",
        replica.replica_id,
        replica.plane.uri,
        replica.metrics_server.url(settings.tensor_host),
    )
    await stop.wait()
    log.info("stopping: finishing the step in hand")
    await asyncio.gather(*tasks, return_exceptions=True)
    await replica.close()
    log.info("stopped")


def configure_torch(settings: Settings) -> None:
    """Resolve the device and apply the thread count: every process that runs a model does this
    first (a replica, and a parallel group's followers)."""
    import torch

    from shared.tensor_plane.torch_codec import resolve_device

    settings.device = resolve_device(settings.device)  # "auto": cuda when torch sees a GPU
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)


@dataclass
class Replica:
    """What one replica holds while it runs; `close()` lets go of it all."""

    replica_id: str
    settings: Settings
    compute: ThreadPoolExecutor
    bus: Bus
    runners: list[ModelRunner]
    plane: TensorPlane
    metrics_server: metrics.MetricsServer
    remote: RemoteSteps
    cache: InputCache = field(default_factory=InputCache)
    cancelled: CancelledRuns = field(default_factory=CancelledRuns)
    loras: LoraRegistry | None = None  # followed where a runner frees deleted LoRAs

    @classmethod
    async def start(cls, spec: ServiceSpec, settings: Settings, model_ids: list[str]) -> Replica:
        replica_id = f"{spec.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}".replace(".", "-")
        # One compute thread: torch work never runs on the event loop, and models in one process
        # take turns instead of fighting over the same cores.
        compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{spec.name}-compute")
        bus = Bus(settings, name=replica_id)
        await bus.connect()  # first: a missing NATS fails in seconds, not after loading models
        await bus.ensure_streams()
        runners = await _load(spec, settings, model_ids, compute)
        plane = TensorPlane(settings)
        await plane.start()
        metrics.watch_plane(plane)
        metrics.watch_models(runners, settings.device)
        metrics_server = metrics.MetricsServer()
        metrics_server.start(settings.tensor_bind, settings.metrics_port)
        remote = RemoteSteps(bus, plane, replica_id)
        replica = cls(replica_id, settings, compute, bus, runners, plane, metrics_server, remote)
        await replica._subscribe()
        return replica

    async def _subscribe(self) -> None:
        """Releases free this replica's tensors and cached inputs; cancels stop their steps;
        results of the steps its runners call (ControlNet) come back to `remote`; LoRA prefetch
        hints reach the runners that take them (`prefetch(loras)`)."""

        def release(owner: str) -> None:
            self.plane.release(owner)
            self.cache.drop(owner)

        await self.bus.subscribe_release(release)
        await self.bus.subscribe_cancel(self.cancelled.add)
        for runner in self.runners:  # a denoiser reads a planned request's LoRAs early
            prefetch = getattr(runner, "prefetch", None)
            if prefetch is not None:
                await self.bus.subscribe_lora_prefetch(runner.model_id, prefetch)
        forgetters = [r.forget_lora for r in self.runners if hasattr(r, "forget_lora")]
        if forgetters:  # and frees a deleted LoRA's memory once no request holds it
            self.loras = LoraRegistry(self.bus)
            self.loras.on_delete.extend(forgetters)
            self.loras.follow_in_background()
        await self.remote.start()

    def consume(self, stop: asyncio.Event) -> list[asyncio.Task]:
        """Tasks until `stop`: a worker and a heartbeat per (runner, step kind), and the backlog gauge."""
        tasks = []
        for runner in self.runners:
            # A runner that batches (the denoiser's engine) takes several steps at once: each waits
            # on a thread of its own while the runner's engine thread computes them together.
            concurrency = getattr(runner, "concurrency", 1)
            waiters: Executor = self.compute
            if concurrency > 1:
                waiters = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"{runner.model_id}-steps")
            for kind in runner.kinds:
                worker = self._worker(runner, kind, waiters, concurrency)
                tasks.append(asyncio.create_task(worker.run(stop)))
                tasks.append(asyncio.create_task(announce_forever(self.bus, self._describer(runner, worker), stop)))
        consumers = [(str(kind), r.model_id) for r in self.runners for kind in r.kinds]
        tasks.append(asyncio.create_task(metrics.sample_backlog(self.bus.consumer_backlog, consumers, stop)))
        return tasks

    def _worker(self, runner: ModelRunner, kind: StepKind | str, waiters: Executor, concurrency: int) -> StepWorker:
        handler = ModelStepHandler(
            runner, self.plane, self.bus, waiters, self.replica_id, self.remote, self.cache, self.cancelled
        )
        return StepWorker(
            self.bus, kind, runner.model_id, handler, self.replica_id, cancelled=self.cancelled, concurrency=concurrency
        )

    def _describer(self, runner: ModelRunner, worker: StepWorker) -> Callable[[], ReplicaInfo]:
        """The heartbeat of one (runner, kind): fixed facts, then live ones at each beat."""
        info = ReplicaInfo(
            replica_id=self.replica_id,
            kind=worker.kind,
            model_id=runner.model_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            device=self.settings.device,
            tensor_uri=self.plane.uri,
            started_at=time.time(),
            metrics_url=self.metrics_server.url(self.settings.tensor_host),
        )

        def describe() -> ReplicaInfo:
            held = self.plane.stats["stored"]  # a property
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

        return describe

    async def close(self) -> None:
        if self.loras is not None:
            await self.loras.close()
        for runner in self.runners:
            close = getattr(runner, "close", None)
            if close is not None:
                close()
        await self.bus.close()
        await self.plane.close()
        self.metrics_server.stop()
        self.compute.shutdown(wait=False, cancel_futures=True)


async def _load(spec: ServiceSpec, settings: Settings, model_ids: list[str], compute: Executor) -> list[ModelRunner]:
    """Load and warm up each model on the compute thread (the event loop stays free)."""
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    runners = [await loop.run_in_executor(compute, spec.load, m, settings) for m in model_ids]
    for runner in runners:
        await loop.run_in_executor(compute, runner.warm_up)
    log.info("loaded %s in %.1fs", ",".join(model_ids), time.perf_counter() - t0)
    return runners
