"""One step on a model replica: pull its input tensors, run the model off the event loop,
publish the outputs as tensor refs. `StepWorker` (shared/worker.py) decides when and settles."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from typing import Any

from shared import tracing
from shared.bus import Bus
from shared.input_cache import InputCache
from shared.messages import StepProgress, StepRequest, StepResult, TensorRef
from shared.model_runner import ModelRunner, StepContext
from shared.remote_steps import RemoteSteps
from shared.tensor_plane import TensorPlane, TensorUnavailable
from shared.worker import CancelledRuns, InputLost


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
