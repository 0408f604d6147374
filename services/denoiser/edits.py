"""What the edit loops (img2img, inpainting) of every family share: the pipelines'
`get_timesteps` for a strength, the edit's tensors checked against the request, and the one
generator draw the VAE made for the image latents.

Why apart from `loop.py`: these steps exist only in the img2img / inpaint pipelines, and the
family edit loops (`families/sd3_edit.py`, `families/flux_edit.py`) are their only users.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers.utils.torch_utils import randn_tensor

from shared.workflows.edits import edit_steps

if TYPE_CHECKING:
    from services.denoiser.loop import DenoiseInputs, Scheduler


def strength_timesteps(
    scheduler: Scheduler, num_inference_steps: int, strength: float, unet: bool = False
) -> tuple[torch.Tensor, int]:
    """The img2img / inpaint pipelines' `get_timesteps` (`shared.workflows.edits.edit_steps`: the
    UNet pipelines' rounding with `unet`): the last `strength` of the schedule (and the
    scheduler's begin index there), and how many steps that is. Raises ValueError when
    strength x steps leaves no step, as the inpaint pipelines do."""
    t_start, _ = edit_steps(num_inference_steps, strength, unet)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    steps = num_inference_steps - t_start
    if steps < 1:
        raise ValueError(
            f"strength {strength} of {num_inference_steps} steps leaves no denoising step: "
            "raise strength or num_inference_steps"
        )
    return timesteps, steps


def edit_tensors(inputs: DenoiseInputs, latent_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The edit's image latents (`latent_shape`, one image) and its latent-size mask (None:
    img2img), refused when they were made for another size."""
    image = inputs.tensors.get("image_latents")
    if image is None:
        raise ValueError("an edit (strength set) needs the 'image_latents' input: the VAE-encoded image")
    if tuple(image.shape) != tuple(latent_shape):
        raise ValueError(
            f"image_latents of shape {tuple(image.shape)} do not fit this request (want {tuple(latent_shape)}: "
            "encode the image at the request's size)"
        )
    mask = inputs.tensors.get("mask")
    if mask is not None and tuple(mask.shape) != (1, 1, *latent_shape[2:]):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit latents {tuple(latent_shape)}")
    return image, mask


def skip_image_sample(generator: torch.Generator, image_latents: torch.Tensor) -> None:
    """Advance the request's generator past the draw the pipeline makes first with it: the image
    latents' `latent_dist.sample(generator)`, which the VAE service drew from the same seed."""
    randn_tensor(tuple(image_latents.shape), generator=generator, device=torch.device("cpu"), dtype=image_latents.dtype)


def blend_outside_mask(
    scheduler: Scheduler,
    latents: torch.Tensor,
    image_latents: torch.Tensor,
    noise: torch.Tensor,
    mask: torch.Tensor,
    next_timestep: torch.Tensor | None,
) -> torch.Tensor:
    """The inpaint pipelines' blend after each step: outside the mask, the image latents noised
    to the next timestep (clean after the last step); inside it, the denoised latents."""
    proper = image_latents
    if next_timestep is not None:
        proper = scheduler.scale_noise(proper, torch.tensor([next_timestep]), noise)
    return (1 - mask) * proper + mask * latents


@dataclass
class UnetEdit:
    """A UNet family's edit once started (`start_unet_edit`): what each step's blend needs."""

    image_latents: torch.Tensor
    noise: torch.Tensor
    mask: torch.Tensor | None

    def after_step(self, scheduler: Scheduler, latents: torch.Tensor, timesteps: torch.Tensor, i: int) -> torch.Tensor:
        """The SD / SDXL inpaint pipelines' blend (4-channel UNet): outside the mask, the image
        latents noised (`add_noise`) to the next timestep; img2img: the latents unchanged."""
        if self.mask is None:
            return latents
        proper = self.image_latents
        if i < len(timesteps) - 1:
            proper = scheduler.add_noise(proper, self.noise, torch.tensor([timesteps[i + 1]]))
        return ((1 - self.mask) * proper + self.mask * latents).contiguous()


def _pipeline_mask_layout(mask: torch.Tensor, n: int) -> torch.Tensor:
    """The latent mask as the SD / SDXL inpaint pipelines hold it for the blend: a plain
    contiguous batch of n."""
    return mask.contiguous().repeat(n, 1, 1, 1)


def start_unet_edit(
    scheduler: Scheduler,
    inputs: DenoiseInputs,
    num_inference_steps: int,
    shape: tuple[int, ...],
    generator: torch.Generator,
    here: dict,
) -> tuple[torch.Tensor, int, torch.Tensor, UnetEdit]:
    """`StableDiffusion[XL]Img2ImgPipeline` / `...InpaintPipeline` steps 4-5 on a 4-channel UNet:
    (timesteps, steps, initial latents, the edit) for a schedule already set."""
    timesteps, steps = strength_timesteps(scheduler, num_inference_steps, inputs.strength or 0.0, unet=True)
    image_latents, mask = edit_tensors(inputs, (1, *shape[1:]))
    skip_image_sample(generator, image_latents)
    # Memory layout matters here: the UNet's convolutions round differently on channels-last and
    # contiguous latents, and the latents take their layout from these. The image latents arrive
    # contiguous (the tensor plane's); the img2img pipelines hold the VAE's sample with
    # channels-last strides (as diffusers 0.42 computes it on the CPU) and `cat` it, the inpaint
    # pipelines `repeat` it into a contiguous batch and make every blend contiguous. The oracle
    # (tests/unit/test_unet_edits_match_pipeline.py) is bit-identical with these layouts.
    image_latents = image_latents.to(**here)
    if mask is None:
        image_latents = torch.cat([image_latents.contiguous(memory_format=torch.channels_last)] * shape[0])
    else:  # the inpaint pipelines `repeat` it: a plain contiguous batch
        image_latents = image_latents.contiguous().repeat(shape[0], 1, 1, 1)
    noise = randn_tensor(shape, generator=generator, device=here["device"], dtype=here["dtype"])
    if mask is not None and inputs.strength == 1.0:  # the inpaint pipelines start from pure noise
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(shape[0]))
    if mask is not None:
        mask = _pipeline_mask_layout(mask.to(**here), shape[0])
    return timesteps, steps, latents, UnetEdit(image_latents, noise, mask)
