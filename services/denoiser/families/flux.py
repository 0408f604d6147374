"""Flux's loop: `FluxPipeline.__call__`, and `FluxControlNetPipeline.__call__` with a ControlSpec.

Why it differs from SD3's: Flux is guidance-distilled, so `guidance_scale` goes into the
transformer as its `guidance` embedding (no negative pass: only the prompt row is read), and
its transformer takes latents packed 2x2 into tokens with position ids for text and image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from services.denoiser.loop import FamilyLoop, TransformerCall, guided_batch, placement, residual_list
from shared.zoo.families import FAMILIES

if TYPE_CHECKING:
    from services.denoiser.loop import ControlSpec, DenoiseInputs, DenoiseLoop, Scheduler
    from shared.zoo import DenoiserBundle


def warm_up_inputs(bundle: DenoiserBundle) -> dict[str, torch.Tensor]:
    """Zero encoder outputs: CLIP-L's pooler and T5 tokens of the transformer's widths."""
    cfg = bundle.transformer.config
    return {
        "clip_l_pooler": torch.zeros(2, cfg.pooled_projection_dim),
        "t5_embeds": torch.zeros(2, 8, cfg.joint_attention_dim),
    }


def _packed_noise(
    inputs: DenoiseInputs, channels: int, lat_h: int, lat_w: int, here: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """`prepare_latents`: the seeded noise packed 2x2 into tokens, and the image position ids."""
    n, device = inputs.n, here["device"]
    shape = (n, channels, lat_h, lat_w)
    generator = inputs.generator()
    if inputs.control is not None:
        inputs.control.check_shape((n, (lat_h // 2) * (lat_w // 2), channels * 4), "size and num_images")
        # FluxControlNetPipeline samples the control image's latents with the request's generator
        # first, then the initial noise: the VAE service drew the former from the same seed, so
        # advance our generator by the same draw.
        randn_tensor(shape, generator=generator, device=device, dtype=inputs.control.control_latents.dtype)
    latents = randn_tensor(shape, generator=generator, device=device, dtype=here["dtype"])
    latents = FluxPipeline._pack_latents(latents, n, channels, lat_h, lat_w)
    img_ids = FluxPipeline._prepare_latent_image_ids(n, lat_h // 2, lat_w // 2, device, here["dtype"])
    return latents, img_ids


def _timesteps(
    scheduler: Scheduler, inputs: DenoiseInputs, image_seq_len: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    steps = inputs.num_inference_steps
    sigmas = np.linspace(1.0, 1 / steps, steps)
    if inputs.control is None and getattr(scheduler.config, "use_flow_sigmas", False):
        sigmas = None  # FluxPipeline only; the ControlNet pipeline does not look
    mu = calculate_shift(
        image_seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    return retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)


def _guidance(
    transformer: torch.nn.Module, inputs: DenoiseInputs, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The transformer's `guidance` argument (None without `guidance_embeds`), and the guidance
    the ControlNet gets (the adapter drops it for a ControlNet without `guidance_embeds`)."""
    if inputs.control is None:
        full = torch.full([1], inputs.guidance_scale, device=device, dtype=torch.float32).expand(inputs.n)
    else:  # FluxControlNetPipeline builds the same values as torch.tensor([guidance_scale])
        full = torch.tensor([inputs.guidance_scale], device=device).expand(inputs.n)
    return (full if transformer.config.guidance_embeds else None), full


def _control_constant(
    control: ControlSpec, prompt: dict[str, torch.Tensor], guidance: torch.Tensor, here: dict
) -> dict[str, torch.Tensor]:
    """What the ControlNet pipeline's ControlNet call gets at every step (see ControlSpec)."""
    return {
        "prompt_embeds": prompt["encoder_hidden_states"],
        "pooled_projections": prompt["pooled_projections"],
        "controlnet_cond": control.control_latents.to(**here),
        "txt_ids": prompt["txt_ids"],
        "img_ids": prompt["img_ids"],
        "guidance": guidance,
    }


def flux_loop(bundle: DenoiserBundle, scheduler: Scheduler, inputs: DenoiseInputs) -> DenoiseLoop:
    """FluxPipeline.__call__ (FluxControlNetPipeline's with `control`), without true CFG."""
    transformer = bundle.transformer
    here = placement(transformer)
    device, control = here["device"], inputs.control
    pooled = guided_batch(inputs.tensors["clip_l_pooler"][0:1], None, inputs.n, here)
    prompt_embeds = guided_batch(inputs.tensors["t5_embeds"][0:1], None, inputs.n, here)
    text_ids = torch.zeros(prompt_embeds.shape[1], 3).to(device=device, dtype=pooled.dtype)

    channels = transformer.config.in_channels // 4
    packed = 2 * FAMILIES[bundle.family].vae_scale_factor  # VAE 8x, then 2x2 packing
    lat_h, lat_w = 2 * (inputs.height // packed), 2 * (inputs.width // packed)
    latents, img_ids = _packed_noise(inputs, channels, lat_h, lat_w, here)
    timesteps, num_inference_steps = _timesteps(scheduler, inputs, latents.shape[1], device)
    guidance, control_guidance = _guidance(transformer, inputs, device)
    if control is None:
        scheduler.set_begin_index(0)
    prompt = {"pooled_projections": pooled, "encoder_hidden_states": prompt_embeds}
    ids = {"txt_ids": text_ids, "img_ids": img_ids}
    constant = {} if control is None else _control_constant(control, prompt | ids, control_guidance, here)

    for i, t in inputs.steps(timesteps, num_inference_steps, scheduler.order):
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        residuals: dict[str, list[torch.Tensor] | None] = {}
        if control is not None:
            res = control.residuals_at(
                constant, {"hidden_states": latents, "timestep": timestep / 1000}, i, len(timesteps)
            )
            residuals = {
                "controlnet_block_samples": residual_list(res, "block", device),
                "controlnet_single_block_samples": residual_list(res, "single", device),
            }  # and controlnet_blocks_repeat=False: hint-block (XLabs) ControlNets are refused at load
        noise_pred = yield TransformerCall(
            batched={
                "hidden_states": latents,
                "timestep": timestep / 1000,
                "guidance": guidance,
                **prompt,
                "controlnet_block_samples": residuals.get("controlnet_block_samples"),
                "controlnet_single_block_samples": residuals.get("controlnet_single_block_samples"),
            },
            shared={
                **ids,
                "joint_attention_kwargs": {},
                "return_dict": False,
                **({"controlnet_blocks_repeat": False} if residuals else {}),
            },
            cache_context="cond",
        )
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    return FluxPipeline._unpack_latents(latents, inputs.height, inputs.width, FAMILIES[bundle.family].vae_scale_factor)


LOOP = FamilyLoop(families=("flux",), loop=flux_loop, warm_up_inputs=warm_up_inputs)
