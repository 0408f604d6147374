"""SD1.5's prompt layout for the shared UNet loop (`unet.py`): `StableDiffusionPipeline.__call__`.

Why its own module: the UNet's call differs from the MMDiTs' (one prompt tensor, no pooled
projections, the scheduler scales the model input) and SD1.5's schedulers are the classic
multistep ones (PNDM by default); what is SD1.5's own is only the prompt: the text encoder's
last hidden state, [uncond, cond] with guidance, no added conditions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from services.denoiser.model import DenoiseLoop, _repeat, _rows
from services.denoiser.unet import unet_guidance, unet_loop
from shared.zoo import DenoiserBundle


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
    do_cfg = unet_guidance(bundle, guidance_scale)
    pos, neg = _rows(tensors["clip_embeds"], "clip_embeds")
    here = {"device": next(unet.parameters()).device, "dtype": unet.dtype}  # the encoder may run in another dtype
    prompt_embeds = _repeat(pos, n).to(**here)
    if do_cfg:
        prompt_embeds = torch.cat([_repeat(neg, n).to(**here), prompt_embeds])
    return unet_loop(
        bundle,
        prompt_embeds,
        None,
        do_cfg=do_cfg,
        set_begin_index=False,
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        n=n,
        on_step=on_step,
        should_stop=should_stop,
    )
