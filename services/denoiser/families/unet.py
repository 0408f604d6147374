"""The denoising loop the UNet pipelines share (SD1.5's and SDXL's), once their prompts are laid out.

Why one loop for both: `StableDiffusionPipeline.__call__` and `StableDiffusionXLPipeline.__call__`
run the same steps (seeded latents times `init_noise_sigma`, `scale_model_input`, UNet,
classifier-free guidance over [uncond, cond], `scheduler.step` with the request's generator,
the progress bar counting PNDM's extra call as warm-up); they differ only in the prompt
tensors they build and in SDXL's `added_cond_kwargs` (pooled text embeds and size time ids)
and `set_begin_index(0)`. The family modules (`sd15`, `sdxl`) build those; this generator
does the rest, yielding `TransformerCall`s so the batching engine merges UNet calls of
several requests. A multistep scheduler keeps state between steps (PNDM its past noise
predictions, Euler its step index), which is why every request steps a fresh copy of it.

Not a family of its own: it offers no `LOOP`.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from services.denoiser.edits import start_unet_edit
from services.denoiser.loop import TransformerCall, guide, guided_input
from shared.zoo.families import FAMILIES

if TYPE_CHECKING:
    from services.denoiser.loop import DenoiseInputs, DenoiseLoop, Scheduler
    from shared.zoo import DenoiserBundle


def _extra_step_kwargs(scheduler: Scheduler, generator: torch.Generator) -> dict[str, object]:
    """`prepare_extra_step_kwargs` with eta 0: DDIM takes `eta`, the ancestral/Euler schedulers
    the request's generator (which drew the initial noise first)."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    return {
        **({"eta": 0.0} if "eta" in accepted else {}),
        **({"generator": generator} if "generator" in accepted else {}),
    }


def unet_guidance(bundle: DenoiserBundle, guidance_scale: float) -> bool:
    """Whether the pipeline runs classifier-free guidance (`guidance_scale > 1`); refuses the
    LCM-style UNets whose guidance the pipeline would embed instead (`time_cond_proj_dim`)."""
    if bundle.transformer.config.time_cond_proj_dim is not None:
        raise ValueError(f"{bundle.model_id}: UNets with a guidance embedding (time_cond_proj_dim) are not supported")
    return guidance_scale > 1


def unet_loop(
    bundle: DenoiserBundle,
    scheduler: Scheduler,
    inputs: DenoiseInputs,
    prompt_embeds: torch.Tensor,
    added_cond_kwargs: dict[str, torch.Tensor] | None,
    *,
    do_cfg: bool,
    set_begin_index: bool,
) -> DenoiseLoop:
    """The pipelines' steps 4-7 and denoising loop, for `prompt_embeds` (and SDXL's
    `added_cond_kwargs`) already in the UNet's dtype and device, rows [uncond, cond] when
    `do_cfg`. `set_begin_index`: SDXL's pipeline pins the scheduler's begin index to 0."""
    unet = bundle.transformer
    device = prompt_embeds.device

    timesteps, num_inference_steps = retrieve_timesteps(scheduler, inputs.num_inference_steps, device, None, None)
    vae_scale = FAMILIES[bundle.family].vae_scale_factor
    shape = (inputs.n, unet.config.in_channels, inputs.height // vae_scale, inputs.width // vae_scale)
    generator = inputs.generator()
    edit = None
    if inputs.strength is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        latents = latents * scheduler.init_noise_sigma
    else:  # img2img / inpaint: the pipelines' get_timesteps set the begin index already
        here = {"device": device, "dtype": prompt_embeds.dtype}
        timesteps, num_inference_steps, latents, edit = start_unet_edit(
            scheduler, inputs, num_inference_steps, shape, generator, here
        )
        set_begin_index = False
    extra_step_kwargs = _extra_step_kwargs(scheduler, generator)
    if set_begin_index and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)

    for i, t in inputs.steps(timesteps, num_inference_steps, scheduler.order):
        latent_model_input = guided_input(latents, do_cfg)
        if hasattr(scheduler, "scale_model_input"):
            latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        noise_pred = yield TransformerCall(
            batched={
                "sample": latent_model_input,
                # The pipeline passes `t` as a scalar, which the UNet expands to the batch: the
                # same values, but requests at other timesteps can then share the call.
                "timestep": t.expand(latent_model_input.shape[0]),
                "encoder_hidden_states": prompt_embeds,
                "timestep_cond": None,  # `unet_guidance` refused UNets that take one
                "added_cond_kwargs": added_cond_kwargs,
            },
            shared={"cross_attention_kwargs": None, "return_dict": False},
        )
        if do_cfg:
            noise_pred = guide(noise_pred, inputs.guidance_scale)
        latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
        if edit is not None:
            latents = edit.after_step(scheduler, latents, timesteps, i)
    return latents
