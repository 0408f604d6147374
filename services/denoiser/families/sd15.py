"""SD1.5's prompt layout for the shared UNet loop (`unet.py`): `StableDiffusionPipeline.__call__`.

Why its own module: the UNet's call differs from the MMDiTs' (one prompt tensor, no pooled
projections, the scheduler scales the model input) and SD1.5's schedulers are the classic
multistep ones (PNDM by default); what is SD1.5's own is only the prompt: the text encoder's
last hidden state, [uncond, cond] with guidance, no added conditions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from services.denoiser.families.unet import unet_guidance, unet_loop
from services.denoiser.loop import FamilyLoop, guided_batch, placement, rows

if TYPE_CHECKING:
    from services.denoiser.loop import DenoiseInputs, DenoiseLoop, Scheduler
    from shared.zoo import DenoiserBundle


def warm_up_inputs(bundle: DenoiserBundle) -> dict[str, torch.Tensor]:
    """Zero text-encoder states of the UNet's cross-attention width."""
    return {"clip_embeds": torch.zeros(2, 77, bundle.transformer.config.cross_attention_dim)}


def sd15_loop(bundle: DenoiserBundle, scheduler: Scheduler, inputs: DenoiseInputs) -> DenoiseLoop:
    """StableDiffusionPipeline.__call__ (no IP-Adapter, no guidance rescale, no clip skip).

    `inputs.tensors["clip_embeds"]`: the text encoder's last hidden state, two rows [prompt,
    negative_prompt]; the negative row is used only with classifier-free guidance
    (guidance_scale > 1), in the pipeline's order [uncond, cond]. Progress is reported as the
    pipeline's progress bar advances: PNDM runs one more UNet call than `num_inference_steps`
    (its first timestep twice), counted as warm-up. Not a generator itself: what the UNet
    cannot take is refused when the loop is made.
    """
    do_cfg = unet_guidance(bundle, inputs.guidance_scale)
    pos, neg = rows(inputs.tensors["clip_embeds"], "clip_embeds")
    prompt_embeds = guided_batch(pos, neg if do_cfg else None, inputs.n, placement(bundle.transformer))
    return unet_loop(bundle, scheduler, inputs, prompt_embeds, None, do_cfg=do_cfg, set_begin_index=False)


LOOP = FamilyLoop(families=("sd15",), loop=sd15_loop, warm_up_inputs=warm_up_inputs)
