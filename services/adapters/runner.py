"""Adapters service: hosts ControlNets, each shared by every workflow and base replica naming it.

A ControlNet step is one denoising step of some request: the denoiser sends the step's
latents and timestep, plus the request's constant tensors (prompt embeddings, control
latents; pulled once per request thanks to `cache_inputs`), and gets the residuals back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.messages import CONSTANT_INPUT as CONSTANT
from shared.messages import VARYING_INPUT as VARYING
from shared.messages import StepKind, StepRequest
from shared.service import ServiceSpec, StepContext, param_bytes
from shared.settings import Settings
from shared.worker import BadStepInput
from shared.zoo.registry import models_of_service


@dataclass
class ControlNetRunner:
    model_id: str
    bundle: Any
    kinds: tuple[StepKind, ...] = (StepKind.CONTROLNET,)

    def run(self, step: StepRequest, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        from services.adapters.model import controlnet_residuals

        constant = {k.removeprefix(CONSTANT): v for k, v in inputs.items() if k.startswith(CONSTANT)}
        varying = {k.removeprefix(VARYING): v for k, v in inputs.items() if k.startswith(VARYING)}
        if not varying:
            raise BadStepInput("a controlnet step needs 'v.*' (per-step) inputs: latents and timestep")
        params = {k: v for k, v in step.params.items() if k != "cache_inputs"}
        try:
            return controlnet_residuals(self.bundle, constant, varying, params)
        except (KeyError, ValueError) as exc:  # names or shapes no replica could run
            raise BadStepInput(f"{type(exc).__name__}: {exc}") from exc

    def warm_up(self) -> None:
        """ControlNet inputs depend on the calling denoiser's shapes; the first call warms it."""

    def status(self) -> dict[str, Any]:
        return {"param_bytes": param_bytes(self.bundle.controlnet)}


def load(model_id: str, settings: Settings) -> ControlNetRunner:
    from shared.zoo import load_controlnet

    return ControlNetRunner(model_id=model_id, bundle=load_controlnet(model_id, settings))


SPEC = ServiceSpec(
    name="adapters",
    default_models=models_of_service("adapters"),
    load=load,
    description="Adapters service: hosts ControlNets; one replica serves every workflow and base model using it.",
)
