"""Sending whole-workflow requests to the monolithic baseline: the gateway's part, in small.

The baseline has no gateway of its own (the comparison is about serving, not HTTP): a client
publishes one `pipeline` step (`baseline.monolith.steps`) per request, waits for its result on
its own result subject, and pulls the images from the replica's tensor plane, as the mesh's
gateway does. No torch.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import numpy as np

from baseline.monolith.steps import PIPELINE, pipeline_step
from shared.bus import Bus
from shared.messages import StepResult
from shared.subjects import result_subject
from shared.tensor_plane import TensorPlane


class MonolithClient:
    def __init__(self, bus: Bus, plane: TensorPlane) -> None:
        self.bus = bus
        self.plane = plane
        self.client_id = f"mono-client-{uuid.uuid4().hex[:8]}"
        self._waiting: dict[str, asyncio.Future[StepResult]] = {}
        self._consumers: set[str] = set()

    async def start(self) -> None:
        async def on_result(result: StepResult) -> None:
            future = self._waiting.get(result.request_id)
            if future is not None and not future.done():
                future.set_result(result)

        await self.bus.subscribe_results(self.client_id, on_result)

    async def generate(self, workflow: str, params: dict[str, Any], timeout_s: float = 300.0) -> np.ndarray:
        """(n, H, W, 3) uint8 images for one request; raises RuntimeError with the step's error."""
        if workflow not in self._consumers:
            # The consumer is its backlog: it must exist while no replica of the workflow runs,
            # so that the autoscaler sees the requests waiting for one.
            await self.bus.ensure_consumer(PIPELINE, workflow)
            self._consumers.add(workflow)
        request_id = uuid.uuid4().hex
        future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            await self.bus.publish_step(
                pipeline_step(request_id, workflow, params, result_subject(self.client_id), timeout_s)
            )
            result = await asyncio.wait_for(future, timeout_s)
            if not result.ok or "images" not in result.outputs:
                raise RuntimeError(f"{workflow}: {result.error.code if result.error else 'no images'}")
            raw = await self.plane.get(result.outputs["images"])
            return np.array(raw.to_numpy())
        finally:
            self._waiting.pop(request_id, None)
            await self.bus.publish_release(request_id)
