"""SD3's edit loop: `StableDiffusion3Img2ImgPipeline.__call__` without a mask,
`StableDiffusion3InpaintPipeline.__call__` with one (a 16-channel transformer: the mask blends
the image back at every step; 33-channel inpainting transformers are not served).

Why its own loop and not branches in `sd3_loop`: the start (the image's latents noised to the
strength's first timestep, on the tail of the schedule) and the per-step blend are the edit
pipelines' own; the prompt layout, timesteps and transformer call are `sd3.py`'s, reused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers.utils.torch_utils import randn_tensor

from services.denoiser.edits import blend_outside_mask, edit_tensors, skip_image_sample, strength_timesteps
from services.denoiser.families.sd3 import _prompt, _timesteps
from services.denoiser.loop import TransformerCall, guide, guided_input, placement
from shared.zoo.families import FAMILIES

if TYPE_CHECKING:
    from services.denoiser.loop import DenoiseInputs, DenoiseLoop, Scheduler
    from shared.zoo import DenoiserBundle


def sd3_edit_loop(bundle: DenoiserBundle, scheduler: Scheduler, inputs: DenoiseInputs) -> DenoiseLoop:
    transformer = bundle.transformer
    here = placement(transformer)
    device, n = here["device"], inputs.n
    do_cfg = inputs.guidance_scale > 1
    prompt_embeds, pooled = _prompt(inputs, do_cfg, here)
    vae_scale = FAMILIES[bundle.family].vae_scale_factor
    shape = (n, transformer.config.in_channels, inputs.height // vae_scale, inputs.width // vae_scale)
    image_latents, mask = edit_tensors(inputs, (1, *shape[1:]))
    if mask is not None and transformer.config.in_channels != 16:
        raise ValueError(f"{bundle.model_id}: only 16-channel transformers inpaint here")
    patch = transformer.config.patch_size
    timesteps, steps = _timesteps(scheduler, inputs, (shape[2] // patch) * (shape[3] // patch), device)
    timesteps, steps = strength_timesteps(scheduler, steps, inputs.strength or 0.0)
    latent_timestep = timesteps[:1].repeat(n)

    generator = inputs.generator()
    skip_image_sample(generator, image_latents)
    image_latents = torch.cat([image_latents.to(**here)] * n)
    noise = randn_tensor(shape, generator=generator, device=device, dtype=here["dtype"])
    if mask is not None and inputs.strength == 1.0:  # the inpaint pipeline starts from pure noise
        latents = noise
    else:
        latents = scheduler.scale_noise(image_latents, latent_timestep, noise)
    if mask is not None:
        mask = mask.to(**here).repeat(n, 1, 1, 1)

    for i, t in inputs.steps(timesteps, steps, scheduler.order):
        latent_model_input = guided_input(latents, do_cfg)
        noise_pred = yield TransformerCall(
            batched={
                "hidden_states": latent_model_input,
                "timestep": t.expand(latent_model_input.shape[0]),
                "encoder_hidden_states": prompt_embeds,
                "pooled_projections": pooled,
                "block_controlnet_hidden_states": None,
            },
            shared={"joint_attention_kwargs": None, "return_dict": False},
        )
        if do_cfg:
            noise_pred = guide(noise_pred, inputs.guidance_scale)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if mask is not None:
            following = timesteps[i + 1] if i < len(timesteps) - 1 else None
            latents = blend_outside_mask(scheduler, latents, image_latents, noise, mask, following)
    return latents


FAMILIES_SERVED = ("sd3", "sd35-large")
