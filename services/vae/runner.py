"""VAE service: decodes latents into uint8 RGB images, and encodes ControlNet control images.

Decode steps that queue up with latents of one shape are decoded in one call when batching is
on (`LEGO_VAE_MAX_BATCH`, 4 on a GPU, off on the CPU); a step alone is decoded as the pipeline
decodes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.messages import StepKind, StepRequest, VaeEncodeParams
from shared.service import ServiceSpec, StepContext, param_bytes
from shared.settings import Settings
from shared.worker import BadStepInput
from shared.zoo.registry import models_of_service


@dataclass
class VaeRunner:
    model_id: str
    bundle: Any
    kinds: tuple[StepKind, ...] = (StepKind.VAE_DECODE, StepKind.VAE_ENCODE)
    # With a max batch > 1 (`LEGO_VAE_MAX_BATCH`; 4 on a GPU): decode steps that queue up with
    # latents of one shape are decoded in one call (`shared.coalesce`).
    coalescer: Any = None
    concurrency: int = 1

    def run(self, step: StepRequest, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        if step.kind == StepKind.VAE_ENCODE:
            return {"latents": self._encode_control(step, inputs)}
        latents = inputs.get("latents")
        if latents is None or latents.ndim != 4:
            raise BadStepInput("vae_decode needs a 4-D 'latents' input (batch, channels, h, w)")
        if self.coalescer is not None:
            return {"images": self.coalescer.submit(latents).result()}
        return {"images": self._decode_many([latents])[0]}

    def _decode_many(self, batch: list[Any]) -> list[Any]:
        """Decode several steps' latents (same shape) in one call; one step's as the pipeline does."""
        import torch

        from services.vae.model import decode

        if len(batch) == 1:
            return [decode(self.bundle, batch[0])]
        images = decode(self.bundle, torch.cat(batch))
        return list(torch.split(images, [latents.shape[0] for latents in batch]))

    def _encode_control(self, step: StepRequest, inputs: dict[str, Any]) -> Any:
        """The control image of a ControlNet workflow, into latents as its pipeline prepares them."""
        from services.vae.model import encode_control_image

        pixels = inputs.get("pixels")
        p = step.params
        if not isinstance(p, VaeEncodeParams):
            raise BadStepInput(f"a vae_encode step needs VaeEncodeParams, got {type(p).__name__}")
        if pixels is None or pixels.ndim != 3 or pixels.shape[-1] != 3 or str(pixels.dtype) != "torch.uint8":
            raise BadStepInput("vae_encode needs a uint8 'pixels' input of shape (H, W, 3)")
        if tuple(pixels.shape[:2]) != (p.height, p.width):
            raise BadStepInput(f"vae_encode: the control image is {tuple(pixels.shape[:2])}, not {p.height}x{p.width}")
        try:
            return encode_control_image(
                self.bundle,
                pixels,
                family=p.family,
                height=p.height,
                width=p.width,
                seed=p.seed,
                num_images=p.n,
                guidance_scale=p.guidance_scale,
            )
        except ValueError as exc:
            raise BadStepInput(str(exc)) from exc

    def warm_up(self) -> None:
        import torch

        from services.vae.model import decode

        decode(self.bundle, torch.zeros(1, self.bundle.vae.config.latent_channels, 8, 8))

    def status(self) -> dict[str, Any]:
        return {"param_bytes": param_bytes(self.bundle.vae)}

    def close(self) -> None:
        if self.coalescer is not None:
            self.coalescer.close()


def _latents_key(latents: Any) -> tuple:
    return (tuple(latents.shape[1:]), str(latents.dtype), str(latents.device))


def load(model_id: str, settings: Settings) -> VaeRunner:
    from shared import metrics
    from shared.coalesce import Coalescer, max_batch
    from shared.zoo import load_vae

    runner = VaeRunner(model_id=model_id, bundle=load_vae(model_id, settings))
    batch = max_batch(settings.vae_max_batch, settings.device, gpu_default=4)
    if batch > 1:
        runner.coalescer = Coalescer(
            runner._decode_many,
            key=_latents_key,  # other sizes are decoded apart
            max_batch=batch,
            name=f"coalesce-{model_id}",
            on_batch=metrics.StepMetrics(str(StepKind.VAE_DECODE), model_id).batch.observe,
        )
        runner.concurrency = batch
    return runner


SPEC = ServiceSpec(
    name="vae",
    default_models=models_of_service("vae"),
    load=load,
    description="VAE service: decodes latents to images and encodes control images to latents.",
)
