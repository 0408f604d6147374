"""VAE service: decodes latents into uint8 RGB images, encodes ControlNet control images, and
encodes an edit's image (and mask) into the latents img2img / inpainting start from.

Decode steps that queue up with latents of one shape are decoded in one call when batching is
on (`LEGO_VAE_MAX_BATCH`, 4 on a GPU, off on the CPU), and so are edits' image encodes of one
size (each sampled with its own seed); a step alone runs as the pipeline runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.coalescing_runner import CoalescingRunner
from shared.messages import StepKind, StepRequest, VaeEncodeParams
from shared.service import ServiceSpec, StepContext, param_bytes
from shared.worker import BadStepInput
from shared.zoo import load_vae
from shared.zoo.registry import models_of_service


@dataclass
class VaeRunner(CoalescingRunner[Any, Any]):  # latents in, uint8 images out (torch tensors)
    # With a max batch > 1 (`LEGO_VAE_MAX_BATCH`; 4 on a GPU): decode steps that queue up with
    # latents of one shape are decoded in one call (`shared.coalescing_runner`), edits' images
    # of one size encoded in one call. Control images (one per ControlNet request) run alone.
    kinds: tuple[StepKind, ...] = (StepKind.VAE_DECODE, StepKind.VAE_ENCODE)

    def run(self, step: StepRequest, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        if step.kind == StepKind.VAE_ENCODE:
            if isinstance(step.params, VaeEncodeParams) and step.params.purpose == "image":
                return self._encode_edit(step.params, inputs)
            return {"latents": self._encode_control(step, inputs)}
        latents = inputs.get("latents")
        if latents is None or latents.ndim != 4:
            raise BadStepInput("vae_decode needs a 4-D 'latents' input (batch, channels, h, w)")
        return {"images": self.run_one(latents)}

    def run_many(self, items: list[Any]) -> list[Any]:
        """Decode several steps' latents (same shape) in one call, or encode several edits'
        images (same size); one step's as the pipeline does."""
        import torch

        from services.vae.model import EditImage, decode, encode_edits

        if isinstance(items[0], EditImage):
            return encode_edits(self.bundle, items)
        if len(items) == 1:
            return [decode(self.bundle, items[0])]
        images = decode(self.bundle, torch.cat(items))
        return list(torch.split(images, [latents.shape[0] for latents in items]))

    def batch_key(self, item: Any) -> tuple:
        """Latents of other sizes (or dtypes, devices) are decoded apart; edits' images of other
        sizes are encoded apart, and never with latents to decode."""
        from services.vae.model import EditImage

        if isinstance(item, EditImage):
            return ("edit", tuple(item.image.shape))
        return ("decode", tuple(item.shape[1:]), str(item.dtype), str(item.device))

    def _encode_edit(self, params: VaeEncodeParams, inputs: dict[str, Any]) -> dict[str, Any]:
        """An edit's image (and mask) into its image latents (and latent-size mask)."""
        from services.vae.model import prepare_edit

        pixels = inputs.get("pixels")
        if pixels is None:
            raise BadStepInput("an image vae_encode step needs a uint8 'pixels' input of shape (H, W, 3)")
        try:
            item = prepare_edit(self.bundle, pixels, inputs.get("mask"), params)
        except ValueError as exc:
            raise BadStepInput(str(exc)) from exc
        return dict(self.run_one(item))

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
            return encode_control_image(self.bundle, pixels, p)
        except ValueError as exc:
            raise BadStepInput(str(exc)) from exc

    def status(self) -> dict[str, Any]:
        return {"param_bytes": param_bytes(self.bundle.vae)}

    def warm_up(self) -> None:
        import torch

        from services.vae.model import decode

        decode(self.bundle, torch.zeros(1, self.bundle.vae.config.latent_channels, 8, 8))


SPEC = ServiceSpec(
    name="vae",
    default_models=models_of_service("vae"),
    load=VaeRunner.loader(load_vae, lambda settings: settings.vae_max_batch, gpu_default=4, kind=StepKind.VAE_DECODE),
    description="VAE service: decodes latents to images and encodes control images to latents.",
)
