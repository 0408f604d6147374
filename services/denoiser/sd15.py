"""SD1.5's denoising loop: `StableDiffusionPipeline.__call__` step for step, on a UNet.

Why its own module: the UNet's call differs from the MMDiTs' (one prompt tensor, no pooled
projections, the scheduler scales the model input) and SD1.5's schedulers are the classic
multistep ones (PNDM by default), yet it is the same kind of generator as the other loops
(`model.DenoiseLoop`), so the batching engine merges UNet calls of several requests as it
merges transformer calls. A multistep scheduler keeps state between steps (PNDM its past
noise predictions), which is why every request steps a fresh copy of it: merging calls only
ever concatenates the UNet's inputs, never the schedulers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from services.denoiser.model import VAE_SCALE_FACTOR, DenoiseCancelled, DenoiseLoop, TransformerCall, _repeat, _rows
from shared.zoo import DenoiserBundle


def _extra_step_kwargs(scheduler, generator: torch.Generator) -> dict[str, object]:
    """`StableDiffusionPipeline.prepare_extra_step_kwargs` with eta 0: DDIM takes `eta`, the
    ancestral/Euler schedulers the request's generator (which drew the initial noise first)."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    return {
        **({"eta": 0.0} if "eta" in accepted else {}),
        **({"generator": generator} if "generator" in accepted else {}),
    }


def sd15_loop(
    bundle: DenoiserBundle,
    tensors: dict[str, torch.Tensor],
    *,
    height: int,
    width: int,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    n: int,
    on_step: Callable[[int, int], None] | None,
    should_stop: Callable[[], bool] | None,
) -> DenoiseLoop:
    """StableDiffusionPipeline.__call__ (no IP-Adapter, no guidance rescale, no clip skip), for
    arguments `model.denoise_loop` has checked.

    `tensors["clip_embeds"]`: the text encoder's last hidden state, two rows [prompt,
    negative_prompt]; the negative row is used only with classifier-free guidance
    (guidance_scale > 1), in the pipeline's order [uncond, cond]. Progress is reported as the
    pipeline's progress bar advances: PNDM runs one more UNet call than `num_inference_steps`
    (its first timestep twice), counted as warm-up.
    """
    unet = bundle.transformer
    device = next(unet.parameters()).device
    scheduler = type(bundle.scheduler).from_config(bundle.scheduler.config)  # per request: it keeps state

    if unet.config.time_cond_proj_dim is not None:  # LCM-style: the pipeline would embed the guidance scale
        raise ValueError(f"{bundle.model_id}: UNets with a guidance embedding (time_cond_proj_dim) are not supported")
    timestep_cond = None
    do_cfg = guidance_scale > 1

    pos, neg = _rows(tensors["clip_embeds"], "clip_embeds")
    here = {"device": device, "dtype": unet.dtype}  # the encoder may run in another dtype
    prompt_embeds = _repeat(pos, n).to(**here)
    if do_cfg:
        prompt_embeds = torch.cat([_repeat(neg, n).to(**here), prompt_embeds])

    timesteps, num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, device, None, None)
    shape = (n, unet.config.in_channels, height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR)
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
    latents = latents * scheduler.init_noise_sigma
    extra_step_kwargs = _extra_step_kwargs(scheduler, generator)

    num_warmup_steps = len(timesteps) - num_inference_steps * scheduler.order
    done = 0
    for i, t in enumerate(timesteps):
        if should_stop is not None and should_stop():
            raise DenoiseCancelled(f"stopped before UNet call {i + 1}/{len(timesteps)}")
        latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
        if hasattr(scheduler, "scale_model_input"):
            latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        noise_pred = yield TransformerCall(
            batched={
                "sample": latent_model_input,
                # The pipeline passes `t` as a scalar, which the UNet expands to the batch: the
                # same values, but requests at other timesteps can then share the call.
                "timestep": t.expand(latent_model_input.shape[0]),
                "encoder_hidden_states": prompt_embeds,
                "timestep_cond": timestep_cond,
            },
            shared={"cross_attention_kwargs": None, "added_cond_kwargs": None, "return_dict": False},
        )
        if do_cfg:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
        if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % scheduler.order == 0):
            done += 1
            if on_step is not None:
                on_step(done, num_inference_steps)
    return latents
