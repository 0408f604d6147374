"""Calls from one model service to another's step, for work a step needs mid-computation.

Why: a ControlNet workflow's denoiser needs the ControlNet's residuals at every denoising
step, and the ControlNet is its own shared service. The call is an ordinary step on the
ControlNet's subject (so it queues, redelivers and scales like any step), answered on this
replica's own result subject. Compute code runs on a worker thread, so besides the async
`call` there are blocking `*_sync` forms that hop onto the service's event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from shared import subjects, tracing
from shared.bus import Bus
from shared.messages import ErrorInfo, StepKind, StepParamsModel, StepRequest, StepResult, TensorRef
from shared.tensor_plane import RawTensor, TensorPlane

T = TypeVar("T")


class RemoteStepFailed(Exception):
    """The called step answered an error (its `ErrorInfo` is kept for the caller's own answer)."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error


class RemoteSteps:
    """Publishes steps on behalf of this replica and awaits their results."""

    def __init__(self, bus: Bus, plane: TensorPlane, replica_id: str) -> None:
        self.bus = bus
        self.plane = plane
        self.replica_id = replica_id
        self._waiting: dict[tuple[str, str, int], asyncio.Future[StepResult]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.bus.subscribe_results(self.replica_id, self._on_result)

    async def _on_result(self, result: StepResult) -> None:
        future = self._waiting.get((result.request_id, result.node_id, result.attempt))
        if future is not None and not future.done():
            future.set_result(result)

    async def call(
        self,
        *,
        kind: StepKind,
        model_id: str,
        request_id: str,
        node_id: str,
        params: StepParamsModel,
        inputs: dict[str, TensorRef],
        deadline: float,
        owner: str = "",
        priority: int = 0,
    ) -> StepResult:
        """Run one step elsewhere and return its (successful) result.

        `node_id` must be unique per call: the step stream drops a repeated message id.
        `owner` names the outputs on the remote side, so the caller can free them early.
        `priority`: the calling step's, so the call queues in the same band.
        Raises RemoteStepFailed on an error answer, TimeoutError past the deadline.
        """
        step = StepRequest(
            request_id=request_id,
            node_id=node_id,
            kind=kind,
            model_id=model_id,
            params=params,
            inputs=inputs,
            reply_to=subjects.result_subject(self.replica_id),
            deadline=deadline,
            owner=owner,
            priority=priority,
        )
        key = (request_id, node_id, 1)
        future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        self._waiting[key] = future
        try:
            await self.bus.publish_step(step)
            result = await asyncio.wait_for(future, timeout=max(0.0, deadline - time.time()))
        finally:
            self._waiting.pop(key, None)
        if not result.ok:
            raise RemoteStepFailed(result.error or ErrorInfo(code="step_failed", message="remote step failed"))
        return result

    # -- blocking forms for compute threads ---------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("RemoteSteps.start() was not awaited")
        # Under the calling thread's trace context: the steps it publishes nest under its span.
        return asyncio.run_coroutine_threadsafe(tracing.bind(coro), self._loop).result()

    def call_sync(self, **kwargs: Any) -> StepResult:
        return self._run(self.call(**kwargs))

    def get_sync(self, ref: TensorRef) -> RawTensor:
        return self._run(self.plane.get(ref))

    def get_tensor_sync(self, ref: TensorRef, device: str) -> Any:
        """A torch tensor on `device` (GPU to GPU without a host copy where UCX allows)."""
        return self._run(self.plane.get_tensor(ref, device=device))

    def release_everywhere(self, owner: str) -> None:
        """Ask every service to free what it holds for `owner` (fire and forget)."""
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self.bus.publish_release(owner), self._loop)
