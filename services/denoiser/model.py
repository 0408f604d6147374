"""The whole denoising loop of one request, as `StableDiffusion3Pipeline.__call__` runs it.

Why a copy of the pipeline's steps rather than a call to the pipeline: the denoiser service
gets the three encoders' outputs from other services and must stop, report progress and
run concurrently; yet its latents must be bit-identical to the pipeline's. So every step
below mirrors `encode_prompt` (prompt layout), `prepare_latents` (seeding), step 5
(timesteps) and step 7 (the loop) of diffusers' pipeline, using diffusers' own helpers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    calculate_shift,
    retrieve_timesteps,
)
from diffusers.utils.torch_utils import randn_tensor

from shared.zoo import DenoiserBundle


class DenoiseCancelled(Exception):
    """Raised when `should_stop()` says the request was cancelled; no latents are returned."""


def _rows(t: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if t.shape[0] != 2:
        raise ValueError(f"{name} must hold 2 rows [prompt, negative_prompt], got shape {tuple(t.shape)}")
    return t[0:1], t[1:2]


def _repeat(t: torch.Tensor, n: int) -> torch.Tensor:
    """num_images_per_prompt duplication exactly as the pipeline does it (repeat + view)."""
    if t.ndim == 3:
        _, seq_len, _ = t.shape
        return t.repeat(1, n, 1).view(n, seq_len, -1)
    return t.repeat(1, n).view(n, -1)


def _joint(clip_l: torch.Tensor, clip_g: torch.Tensor, t5: torch.Tensor) -> torch.Tensor:
    """SD3's prompt layout: CLIP-L|CLIP-G on channels, zero-padded to T5 width, then T5 tokens after."""
    clip = torch.cat([clip_l, clip_g], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2)


def denoise(
    bundle: DenoiserBundle,
    *,
    clip_l_embeds: torch.Tensor,
    clip_l_pooled: torch.Tensor,
    clip_g_embeds: torch.Tensor,
    clip_g_pooled: torch.Tensor,
    t5_embeds: torch.Tensor,
    height: int,
    width: int,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    num_images: int = 1,
    on_step: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Run all denoising steps; return the final latents (n, C, H/8, W/8), before VAE scaling.

    Each encoder tensor holds two rows, [prompt, negative_prompt]. The negative row is only
    used when guidance_scale > 1 (classifier-free guidance), as in the pipeline.
    Raises DenoiseCancelled if `should_stop()` turns true (checked before every step).
    """
    transformer = bundle.transformer
    device = next(transformer.parameters()).device
    vae_scale_factor = 8
    multiple = vae_scale_factor * transformer.config.patch_size
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
    if num_images < 1 or num_inference_steps < 1:
        raise ValueError("num_images and num_inference_steps must be >= 1")
    # A fresh scheduler per call: set_timesteps/step keep state that concurrent requests must not share.
    scheduler = type(bundle.scheduler).from_config(bundle.scheduler.config)
    do_cfg = guidance_scale > 1

    with torch.inference_mode():
        pos_l, neg_l = _rows(clip_l_embeds, "clip_l_embeds")
        pos_lp, neg_lp = _rows(clip_l_pooled, "clip_l_pooled")
        pos_g, neg_g = _rows(clip_g_embeds, "clip_g_embeds")
        pos_gp, neg_gp = _rows(clip_g_pooled, "clip_g_pooled")
        pos_t5, neg_t5 = _rows(t5_embeds, "t5_embeds")
        n = num_images
        prompt_embeds = _joint(_repeat(pos_l, n), _repeat(pos_g, n), _repeat(pos_t5, n)).to(device)
        pooled = torch.cat([_repeat(pos_lp, n), _repeat(pos_gp, n)], dim=-1).to(device)
        if do_cfg:
            neg_embeds = _joint(_repeat(neg_l, n), _repeat(neg_g, n), _repeat(neg_t5, n)).to(device)
            neg_pooled = torch.cat([_repeat(neg_lp, n), _repeat(neg_gp, n)], dim=-1).to(device)
            prompt_embeds = torch.cat([neg_embeds, prompt_embeds], dim=0)
            pooled = torch.cat([neg_pooled, pooled], dim=0)

        shape = (n, transformer.config.in_channels, height // vae_scale_factor, width // vae_scale_factor)
        generator = torch.Generator("cpu").manual_seed(seed)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)

        scheduler_kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            patch = transformer.config.patch_size
            image_seq_len = (shape[2] // patch) * (shape[3] // patch)
            scheduler_kwargs["mu"] = calculate_shift(
                image_seq_len,
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        timesteps, num_inference_steps = retrieve_timesteps(
            scheduler, num_inference_steps, device, sigmas=None, **scheduler_kwargs
        )
        total = len(timesteps)

        for i, t in enumerate(timesteps):
            if should_stop is not None and should_stop():
                raise DenoiseCancelled(f"stopped before step {i + 1}/{total}")
            latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
            timestep = t.expand(latent_model_input.shape[0])
            noise_pred = transformer(
                hidden_states=latent_model_input,
                timestep=timestep,
                encoder_hidden_states=prompt_embeds,
                pooled_projections=pooled,
                joint_attention_kwargs=None,
                return_dict=False,
            )[0]
            if do_cfg:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(i + 1, total)
    return latents
