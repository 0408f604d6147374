"""The denoiser's side of a ControlNet workflow: each denoising step asks the adapters service.

Why a remote call per step: one loaded ControlNet serves every workflow and every base-model
replica that names it. The denoising loop hands this object its tensors; it uploads the
request's constant tensors (prompt embeddings, control latents) once, the step's varying ones
(latents, timestep) each step, sends one `controlnet` step and pulls the residuals back.
Each step's tensors are freed as soon as the residuals are in.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import torch

from shared.messages import CONSTANT_INPUT as CONSTANT
from shared.messages import VARYING_INPUT as VARYING
from shared.messages import ControlNetParams, StepKind, StepRequest, TensorRef
from shared.remote_steps import RemoteStepFailed, RemoteSteps
from shared.tensor_plane import TensorPlane
from shared.worker import BadStepInput, StepCancelled


class RemoteControlNet:
    """A `ControlNetFn` (see services.denoiser.loop) backed by the adapters service."""

    def __init__(self, remote: RemoteSteps, plane: TensorPlane, step: StepRequest, model_id: str) -> None:
        self.remote = remote
        self.plane = plane
        self.step = step
        self.model_id = model_id
        # Unique per run of the loop: a redelivered denoise step must not reuse message ids.
        self.nonce = uuid.uuid4().hex[:8]
        self.prefix = f"{step.request_id}/{step.node_id}.cn.{self.nonce}"
        self._counter = itertools.count()
        self._constant_of: int | None = None
        self._constant_refs: dict[str, TensorRef] = {}

    def _upload_constant(self, constant: dict[str, torch.Tensor]) -> dict[str, TensorRef]:
        if self._constant_of != id(constant):
            self.plane.release(f"{self.prefix}/const")
            self._constant_refs = {
                CONSTANT + name: self.plane.put_tensor(t, owner=f"{self.prefix}/const") for name, t in constant.items()
            }
            self._constant_of = id(constant)
        return self._constant_refs

    def __call__(
        self, constant: dict[str, torch.Tensor], varying: dict[str, torch.Tensor], params: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        i = next(self._counter)
        owner = f"{self.prefix}/{i}"
        inputs = dict(self._upload_constant(constant))
        inputs.update({VARYING + name: self.plane.put_tensor(t, owner=owner) for name, t in varying.items()})
        try:
            result = self.remote.call_sync(
                kind=StepKind.CONTROLNET,
                model_id=self.model_id,
                request_id=self.step.request_id,
                node_id=f"{self.step.node_id}.cn.{self.nonce}.{i}",
                params=ControlNetParams(**params, cache_inputs=sorted(self._constant_refs)),
                owner=owner,
                inputs=inputs,
                deadline=self.step.deadline,
                priority=self.step.priority,  # the residuals queue in the request's band
            )
            # GPU residuals come device to device over UCX where offered. Host ones map the
            # producer's segment privately, so freeing it right below leaves them intact.
            device = self.plane.settings.device
            return {name: self.remote.get_tensor_sync(ref, device) for name, ref in result.outputs.items()}
        except RemoteStepFailed as exc:
            if exc.error.code == "cancelled":
                raise StepCancelled("the request was cancelled") from exc
            if exc.error.code == "bad_step_input":
                raise BadStepInput(f"controlnet {self.model_id}: {exc.error.message}") from exc
            raise RuntimeError(f"controlnet {self.model_id} failed: {exc}") from exc
        finally:
            self.plane.release(owner)
            self.remote.release_everywhere(owner)

    def close(self) -> None:
        self.plane.release(f"{self.prefix}/const")
