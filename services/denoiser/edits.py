"""What the edit loops (img2img, inpainting) of every family share: the pipelines'
`get_timesteps` for a strength, the edit's tensors checked against the request, and the one
generator draw the VAE made for the image latents.

Why apart from `loop.py`: these steps exist only in the img2img / inpaint pipelines, and the
family edit loops (`families/sd3_edit.py`, `families/flux_edit.py`) are their only users.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers.utils.torch_utils import randn_tensor

if TYPE_CHECKING:
    from services.denoiser.loop import DenoiseInputs, Scheduler


def strength_timesteps(scheduler: Scheduler, num_inference_steps: int, strength: float) -> tuple[torch.Tensor, int]:
    """The img2img / inpaint pipelines' `get_timesteps`: the last `strength` of the schedule (and
    the scheduler's begin index there), and how many steps that is. Raises ValueError when
    strength x steps leaves no step, as the inpaint pipelines do."""
    init_timestep = min(num_inference_steps * strength, num_inference_steps)
    t_start = int(max(num_inference_steps - init_timestep, 0))
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
