"""SD3's and SD3.5-Large's loop: `StableDiffusion3Pipeline.__call__`, and
`StableDiffusion3ControlNetPipeline.__call__` with a ControlSpec.

Why one module for both: SD3.5-Large is the same MMDiT architecture, pipeline and prompt
layout at another size; what differs (widths, depth, its ControlNets' use of the pooled
prompt) is in the configs. Classifier-free guidance runs over [negative, prompt] rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from services.denoiser.loop import (
    FamilyLoop,
    TransformerCall,
    guide,
    guided_batch,
    guided_input,
    placement,
    residual_list,
    rows,
)
from shared.zoo.families import FAMILIES

if TYPE_CHECKING:
    from services.denoiser.loop import ControlSpec, DenoiseInputs, DenoiseLoop, Scheduler
    from shared.zoo import DenoiserBundle


def warm_up_inputs(bundle: DenoiserBundle) -> dict[str, torch.Tensor]:
    """Zero encoder outputs: CLIP-L and CLIP-G of width 1 each (zero-padded to T5's width anyway),
    pooled widths that add up to the transformer's pooled projection."""
    cfg = bundle.transformer.config
    half = cfg.pooled_projection_dim // 2
    return {
        "clip_l_embeds": torch.zeros(2, 77, 1),
        "clip_l_pooled": torch.zeros(2, half),
        "clip_g_embeds": torch.zeros(2, 77, 1),
        "clip_g_pooled": torch.zeros(2, cfg.pooled_projection_dim - half),
        "t5_embeds": torch.zeros(2, 8, cfg.joint_attention_dim),
    }


def _joint(clip_l: torch.Tensor, clip_g: torch.Tensor, t5: torch.Tensor) -> torch.Tensor:
    """SD3's prompt layout: CLIP-L|CLIP-G on channels, zero-padded to T5 width, then T5 tokens after."""
    clip = torch.cat([clip_l, clip_g], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2)


def _prompt(inputs: DenoiseInputs, do_cfg: bool, here: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode_prompt`'s (prompt_embeds, pooled_projections), rows [negative, prompt] with guidance.
    (Laying out one row, then repeating it, moves the same values as the pipeline's
    repeating each encoder's output first: no arithmetic is involved.)"""
    t = inputs.tensors
    l_rows, lp_rows = rows(t["clip_l_embeds"], "clip_l_embeds"), rows(t["clip_l_pooled"], "clip_l_pooled")
    g_rows, gp_rows = rows(t["clip_g_embeds"], "clip_g_embeds"), rows(t["clip_g_pooled"], "clip_g_pooled")
    t5_rows = rows(t["t5_embeds"], "t5_embeds")
    embeds = [_joint(l_rows[r], g_rows[r], t5_rows[r]) for r in (0, 1)]
    pooled = [torch.cat([lp_rows[r], gp_rows[r]], dim=-1) for r in (0, 1)]
    return (
        guided_batch(embeds[0], embeds[1] if do_cfg else None, inputs.n, here),
        guided_batch(pooled[0], pooled[1] if do_cfg else None, inputs.n, here),
    )


def _timesteps(
    scheduler: Scheduler, inputs: DenoiseInputs, image_seq_len: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    scheduler_kwargs = {}
    # The ControlNet pipeline never passes `mu`; the plain one does when the scheduler shifts by size.
    if inputs.control is None and scheduler.config.get("use_dynamic_shifting", None):
        scheduler_kwargs["mu"] = calculate_shift(
            image_seq_len,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.16),
        )
    return retrieve_timesteps(scheduler, inputs.num_inference_steps, device, sigmas=None, **scheduler_kwargs)


def _control_constant(
    control: ControlSpec, prompt_embeds: torch.Tensor, pooled: torch.Tensor, latent_shape: tuple, here: dict
) -> dict[str, torch.Tensor]:
    """What the ControlNet pipeline's ControlNet call gets at every step (see ControlSpec)."""
    control.check_shape((prompt_embeds.shape[0], *latent_shape[1:]), "size, num_images and guidance_scale")
    return {
        "prompt_embeds": prompt_embeds,
        "pooled_projections": pooled,
        "controlnet_cond": control.control_latents.to(**here),
    }


def sd3_loop(bundle: DenoiserBundle, scheduler: Scheduler, inputs: DenoiseInputs) -> DenoiseLoop:
    """StableDiffusion3Pipeline.__call__ (StableDiffusion3ControlNetPipeline's with `control`).
    Runs under the driver's inference mode (a generator must not enter it: loops interleave)."""
    transformer = bundle.transformer
    here = placement(transformer)
    device, control = here["device"], inputs.control
    do_cfg = inputs.guidance_scale > 1
    prompt_embeds, pooled = _prompt(inputs, do_cfg, here)

    vae_scale = FAMILIES[bundle.family].vae_scale_factor
    shape = (inputs.n, transformer.config.in_channels, inputs.height // vae_scale, inputs.width // vae_scale)
    constant = {} if control is None else _control_constant(control, prompt_embeds, pooled, shape, here)
    latents = randn_tensor(shape, generator=inputs.generator(), device=device, dtype=prompt_embeds.dtype)
    patch = transformer.config.patch_size
    timesteps, num_inference_steps = _timesteps(scheduler, inputs, (shape[2] // patch) * (shape[3] // patch), device)

    for i, t in inputs.steps(timesteps, num_inference_steps, scheduler.order):
        latent_model_input = guided_input(latents, do_cfg)
        timestep = t.expand(latent_model_input.shape[0])
        block_residuals = None
        if control is not None:
            varying = {"hidden_states": latent_model_input, "timestep": timestep}
            res = control.residuals_at(constant, varying, i, len(timesteps))
            block_residuals = residual_list(res, "block", device)
        noise_pred = yield TransformerCall(
            batched={
                "hidden_states": latent_model_input,
                "timestep": timestep,
                "encoder_hidden_states": prompt_embeds,
                "pooled_projections": pooled,
                "block_controlnet_hidden_states": block_residuals,
            },
            shared={"joint_attention_kwargs": None, "return_dict": False},
        )
        if do_cfg:
            noise_pred = guide(noise_pred, inputs.guidance_scale)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    return latents


LOOP = FamilyLoop(families=("sd3", "sd35-large"), loop=sd3_loop, warm_up_inputs=warm_up_inputs)
