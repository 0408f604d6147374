"""Flux's edit loop: `FluxImg2ImgPipeline.__call__` without a mask, `FluxInpaintPipeline.__call__`
with one (no true CFG in either).

Why its own loop: as for SD3 (`sd3_edit.py`), the start and the per-step blend are the edit
pipelines' own; here on latents packed 2x2 (image latents, noise and mask packed alike), with
the schedule's sigmas always given (the edit pipelines do not look at `use_flow_sigmas`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from services.denoiser.edits import blend_outside_mask, edit_tensors, skip_image_sample, strength_timesteps
from services.denoiser.families.flux import _guidance
from services.denoiser.loop import TransformerCall, guided_batch, placement
from shared.zoo.families import FAMILIES

if TYPE_CHECKING:
    from services.denoiser.loop import DenoiseInputs, DenoiseLoop, Scheduler
    from shared.zoo import DenoiserBundle


def _edit_timesteps(scheduler: Scheduler, inputs: DenoiseInputs, device: torch.device) -> tuple[torch.Tensor, int]:
    steps = inputs.num_inference_steps
    vae_scale = FAMILIES["flux"].vae_scale_factor
    image_seq_len = (inputs.height // vae_scale // 2) * (inputs.width // vae_scale // 2)
    mu = calculate_shift(
        image_seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    sigmas = np.linspace(1.0, 1 / steps, steps)
    _, steps = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
    return strength_timesteps(scheduler, steps, inputs.strength or 0.0)


def flux_edit_loop(bundle: DenoiserBundle, scheduler: Scheduler, inputs: DenoiseInputs) -> DenoiseLoop:
    transformer = bundle.transformer
    here = placement(transformer)
    device, n, dtype = here["device"], inputs.n, here["dtype"]
    pooled = guided_batch(inputs.tensors["clip_l_pooler"][0:1], None, n, here)
    prompt_embeds = guided_batch(inputs.tensors["t5_embeds"][0:1], None, n, here)
    text_ids = torch.zeros(prompt_embeds.shape[1], 3).to(device=device, dtype=pooled.dtype)

    channels = transformer.config.in_channels // 4
    vae_scale = FAMILIES[bundle.family].vae_scale_factor
    lat_h, lat_w = 2 * (inputs.height // (2 * vae_scale)), 2 * (inputs.width // (2 * vae_scale))
    image_latents, mask = edit_tensors(inputs, (1, channels, lat_h, lat_w))
    img_ids = FluxPipeline._prepare_latent_image_ids(n, lat_h // 2, lat_w // 2, device, dtype)
    timesteps, steps = _edit_timesteps(scheduler, inputs, device)
    latent_timestep = timesteps[:1].repeat(n)

    generator = inputs.generator()
    skip_image_sample(generator, image_latents)
    image_latents = torch.cat([image_latents.to(**here)] * n)
    noise = randn_tensor((n, channels, lat_h, lat_w), generator=generator, device=device, dtype=dtype)
    latents = FluxPipeline._pack_latents(
        scheduler.scale_noise(image_latents, latent_timestep, noise), n, channels, lat_h, lat_w
    )
    noise = FluxPipeline._pack_latents(noise, n, channels, lat_h, lat_w)
    image_latents = FluxPipeline._pack_latents(image_latents, n, channels, lat_h, lat_w)
    if mask is not None:
        mask = mask.to(**here).repeat(n, 1, 1, 1)
        mask = FluxPipeline._pack_latents(mask.repeat(1, channels, 1, 1), n, channels, lat_h, lat_w)
    guidance, _ = _guidance(transformer, inputs, device)
    prompt = {"pooled_projections": pooled, "encoder_hidden_states": prompt_embeds}

    for i, t in inputs.steps(timesteps, steps, scheduler.order):
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        noise_pred = yield TransformerCall(
            batched={
                "hidden_states": latents,
                "timestep": timestep / 1000,
                "guidance": guidance,
                **prompt,
                "controlnet_block_samples": None,
                "controlnet_single_block_samples": None,
            },
            shared={"txt_ids": text_ids, "img_ids": img_ids, "joint_attention_kwargs": {}, "return_dict": False},
            cache_context="cond",
        )
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if mask is not None:
            following = timesteps[i + 1] if i < len(timesteps) - 1 else None
            latents = blend_outside_mask(scheduler, latents, image_latents, noise, mask, following)
    return FluxPipeline._unpack_latents(latents, inputs.height, inputs.width, vae_scale)


FAMILIES_SERVED = ("flux",)
