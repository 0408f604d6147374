"""SDXL's prompt layout for the shared UNet loop (`unet.py`): `StableDiffusionXLPipeline.__call__`.

Why its own module: what SDXL adds to SD1.5's loop is all in the conditioning. Its prompt is
CLIP-L's and CLIP-G's penultimate hidden states side by side on channels (the shared encoders,
read as SD3 reads them), and the UNet's `added_cond_kwargs` carry CLIP-G's projected pool
(`text_embeds`) and the size conditioning (`time_ids`: original size, crop top-left, target
size = (H, W, 0, 0, H, W), as the pipeline's defaults). With an empty negative prompt and
`force_zeros_for_empty_prompt` (SDXL-base's setting) the unconditional row is zeros, not the
encoding of "": the pipeline then sees `negative_prompt=None`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from services.denoiser.families.unet import unet_guidance, unet_loop
from services.denoiser.loop import FamilyLoop, guided_batch, placement, rows

if TYPE_CHECKING:
    from services.denoiser.loop import DenoiseInputs, DenoiseLoop, Scheduler
    from shared.zoo import DenoiserBundle

CROPS_COORDS_TOP_LEFT = (0, 0)


def warm_up_inputs(bundle: DenoiserBundle) -> dict[str, torch.Tensor]:
    """Zero encoder outputs: CLIP-L | CLIP-G on channels (any split of the UNet's cross-attention
    width will do), and a pooled prompt of the width the added embedding leaves for it."""
    cfg = bundle.transformer.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return {
        "clip_l_embeds": torch.zeros(2, 77, 1),
        "clip_g_embeds": torch.zeros(2, 77, cfg.cross_attention_dim - 1),
        "clip_g_pooled": torch.zeros(2, pooled),
    }


def add_time_ids(unet, height: int, width: int, pooled_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """`StableDiffusionXLPipeline._get_add_time_ids` for the default sizes: one row (1, 6),
    checked against the UNet's added-embedding width as the pipeline checks it."""
    ids = [height, width, *CROPS_COORDS_TOP_LEFT, height, width]
    passed = unet.config.addition_time_embed_dim * len(ids) + pooled_dim
    expected = unet.add_embedding.linear_1.in_features
    if passed != expected:
        raise ValueError(
            f"the UNet expects added embeddings of width {expected}, but time ids and a pooled prompt of "
            f"width {pooled_dim} make {passed}: check the UNet's addition_time_embed_dim and clip-g's projection"
        )
    return torch.tensor([ids], dtype=dtype)


def sdxl_loop(bundle: DenoiserBundle, scheduler: Scheduler, inputs: DenoiseInputs) -> DenoiseLoop:
    """StableDiffusionXLPipeline.__call__ (no IP-Adapter, no guidance rescale, no clip skip, no
    denoising_end, default size conditioning).

    `inputs.tensors`: clip_l_embeds and clip_g_embeds (penultimate hidden states) and
    clip_g_pooled (CLIP-G's projected pool), each two rows [prompt, negative_prompt]; the
    negative rows are used only with classifier-free guidance (guidance_scale > 1), and
    replaced by zeros when `inputs.negative_prompt` is empty (or None) and the bundle has
    `force_zeros_for_empty_prompt`. Not a generator itself: what the UNet cannot take is
    refused when the loop is made.
    """
    unet, n = bundle.transformer, inputs.n
    do_cfg = unet_guidance(bundle, inputs.guidance_scale)
    here = placement(unet)
    pos_l, neg_l = rows(inputs.tensors["clip_l_embeds"], "clip_l_embeds")
    pos_g, neg_g = rows(inputs.tensors["clip_g_embeds"], "clip_g_embeds")
    pos_pooled, neg_pooled = rows(inputs.tensors["clip_g_pooled"], "clip_g_pooled")
    pos_embeds, neg_embeds = torch.cat([pos_l, pos_g], dim=-1), torch.cat([neg_l, neg_g], dim=-1)
    time_ids = add_time_ids(unet, inputs.height, inputs.width, pos_pooled.shape[-1], here["dtype"])
    if do_cfg:
        if not inputs.negative_prompt and bundle.force_zeros_for_empty_prompt:
            neg_embeds, neg_pooled = torch.zeros_like(pos_embeds), torch.zeros_like(pos_pooled)
        time_ids = torch.cat([time_ids, time_ids])  # negative_add_time_ids = add_time_ids
    prompt_embeds = guided_batch(pos_embeds, neg_embeds if do_cfg else None, n, here)
    pooled = guided_batch(pos_pooled, neg_pooled if do_cfg else None, n, here)
    time_ids = time_ids.to(here["device"]).repeat(n, 1)
    added_cond_kwargs = {"text_embeds": pooled, "time_ids": time_ids}
    return unet_loop(bundle, scheduler, inputs, prompt_embeds, added_cond_kwargs, do_cfg=do_cfg, set_begin_index=True)


LOOP = FamilyLoop(families=("sdxl",), loop=sdxl_loop, warm_up_inputs=warm_up_inputs)
