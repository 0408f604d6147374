"""VAE service: decodes latents into uint8 RGB images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.messages import StepKind, StepRequest
from shared.service import ProgressFn, ServiceSpec
from shared.settings import Settings
from shared.worker import BadStepInput


@dataclass
class VaeRunner:
    model_id: str
    bundle: Any
    kind: StepKind = StepKind.VAE_DECODE

    def run(self, step: StepRequest, inputs: dict[str, Any], progress: ProgressFn) -> dict[str, Any]:
        from services.vae.model import decode

        latents = inputs.get("latents")
        if latents is None or latents.ndim != 4:
            raise BadStepInput("vae_decode needs a 4-D 'latents' input (batch, channels, h, w)")
        return {"images": decode(self.bundle, latents)}

    def warm_up(self) -> None:
        import torch

        from services.vae.model import decode

        decode(self.bundle, torch.zeros(1, self.bundle.vae.config.latent_channels, 8, 8))


def load(model_id: str, settings: Settings) -> VaeRunner:
    from shared.zoo import load_vae

    return VaeRunner(model_id=model_id, bundle=load_vae(model_id, settings))


SPEC = ServiceSpec(
    name="vae",
    default_models=["sd3-vae"],
    load=load,
    description="VAE service: decodes latents to images.",
)
