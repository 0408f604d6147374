"""Adapters service: hosts ControlNets, each shared by every workflow and base replica naming it.

A ControlNet step is one denoising step of some request: the denoiser sends the step's
latents and timestep, plus the request's constant tensors (prompt embeddings, control
latents; pulled once per request thanks to `cache_inputs`), and gets the residuals back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.coalescing_runner import CoalescingRunner
from shared.messages import CONSTANT_INPUT as CONSTANT
from shared.messages import VARYING_INPUT as VARYING
from shared.messages import StepKind, StepRequest
from shared.service import ServiceSpec, StepContext, param_bytes
from shared.worker import BadStepInput
from shared.zoo import load_controlnet
from shared.zoo.registry import models_of_service

# Flux's position ids have no batch dimension: requests of one size share them.
_UNBATCHED = frozenset({"txt_ids", "img_ids"})

Call = tuple[dict[str, Any], dict[str, Any], dict[str, Any]]  # constant, varying, params


@dataclass
class ControlNetRunner(CoalescingRunner[Call, dict[str, Any]]):
    # With a max batch > 1 (`LEGO_CONTROLNET_MAX_BATCH`; 8 on a GPU): the steps that queue up
    # (the denoising steps of several requests, or of a batching denoiser) run as one call.
    kinds: tuple[StepKind, ...] = (StepKind.CONTROLNET,)

    def run(self, step: StepRequest, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        constant = {k.removeprefix(CONSTANT): v for k, v in inputs.items() if k.startswith(CONSTANT)}
        varying = {k.removeprefix(VARYING): v for k, v in inputs.items() if k.startswith(VARYING)}
        if not varying:
            raise BadStepInput("a controlnet step needs 'v.*' (per-step) inputs: latents and timestep")
        params = step.params.model_dump(exclude={"cache_inputs"})
        return self.run_one((constant, varying, params))

    def run_many(self, calls: list[Call]) -> list[dict[str, Any]]:
        """Several steps' residuals from one ControlNet call (rows stacked); one step as the pipeline."""
        import torch

        from services.adapters.model import controlnet_residuals

        try:
            if len(calls) == 1:
                return [controlnet_residuals(self.bundle, *calls[0])]
            rows = [varying["hidden_states"].shape[0] for _, varying, _ in calls]
            constant = {
                name: t if name in _UNBATCHED else torch.cat([c[name] for c, _, _ in calls])
                for name, t in calls[0][0].items()
            }
            varying = {name: torch.cat([v[name] for _, v, _ in calls]) for name in calls[0][1]}
            out = controlnet_residuals(self.bundle, constant, varying, calls[0][2])
        except (KeyError, ValueError) as exc:  # names or shapes no replica could run
            raise BadStepInput(f"{type(exc).__name__}: {exc}") from exc
        parts = {name: torch.split(t, rows) for name, t in out.items()}
        return [{name: p[i] for name, p in parts.items()} for i in range(len(calls))]

    def batch_key(self, item: Call) -> tuple:
        """Calls that can run as one: same scale, and inputs alike bar the batch dimension."""
        constant, varying, params = item
        shapes = tuple(
            (name, tuple(t.shape) if name in _UNBATCHED else tuple(t.shape[1:]), str(t.dtype))
            for group in (constant, varying)
            for name, t in sorted(group.items())
        )
        return (float(params.get("conditioning_scale", 1.0)), shapes)

    def status(self) -> dict[str, Any]:
        return {"param_bytes": param_bytes(self.bundle.controlnet)}

    def warm_up(self) -> None:
        """ControlNet inputs depend on the calling denoiser's shapes; the first call warms it."""


SPEC = ServiceSpec(
    name="adapters",
    default_models=models_of_service("adapters"),
    load=ControlNetRunner.loader(
        load_controlnet, lambda settings: settings.controlnet_max_batch, gpu_default=8, kind=StepKind.CONTROLNET
    ),
    description="Adapters service: hosts ControlNets; one replica serves every workflow and base model using it.",
)
