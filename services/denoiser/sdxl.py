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

from collections.abc import Callable

import torch

from services.denoiser.model import DenoiseLoop, _repeat, _rows
from services.denoiser.unet import unet_guidance, unet_loop
from shared.zoo import DenoiserBundle

CROPS_COORDS_TOP_LEFT = (0, 0)


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


def sdxl_loop(
    bundle: DenoiserBundle,
    tensors: dict[str, torch.Tensor],
    *,
    negative_prompt: str | None,
    height: int,
    width: int,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    n: int,
    on_step: Callable[[int, int], None] | None,
    should_stop: Callable[[], bool] | None,
) -> DenoiseLoop:
    """StableDiffusionXLPipeline.__call__ (no IP-Adapter, no guidance rescale, no clip skip, no
    denoising_end, default size conditioning), for arguments `model.denoise_loop` has checked.

    `tensors`: clip_l_embeds and clip_g_embeds (penultimate hidden states) and clip_g_pooled
    (CLIP-G's projected pool), each two rows [prompt, negative_prompt]; the negative rows are
    used only with classifier-free guidance (guidance_scale > 1), and replaced by zeros when
    `negative_prompt` is empty (or None) and the bundle has `force_zeros_for_empty_prompt`.
    """
    unet = bundle.transformer
    do_cfg = unet_guidance(bundle, guidance_scale)
    here = {"device": next(unet.parameters()).device, "dtype": unet.dtype}  # the encoders may run in another dtype
    pos_l, neg_l = _rows(tensors["clip_l_embeds"], "clip_l_embeds")
    pos_g, neg_g = _rows(tensors["clip_g_embeds"], "clip_g_embeds")
    pos_pooled, neg_pooled = _rows(tensors["clip_g_pooled"], "clip_g_pooled")
    pos_embeds = torch.cat([pos_l, pos_g], dim=-1)
    time_ids = add_time_ids(unet, height, width, pos_pooled.shape[-1], here["dtype"])

    prompt_embeds = _repeat(pos_embeds, n).to(**here)
    pooled = _repeat(pos_pooled, n).to(**here)
    if do_cfg:
        neg_embeds = torch.cat([neg_l, neg_g], dim=-1)
        if not negative_prompt and bundle.force_zeros_for_empty_prompt:
            neg_embeds, neg_pooled = torch.zeros_like(pos_embeds), torch.zeros_like(pos_pooled)
        prompt_embeds = torch.cat([_repeat(neg_embeds, n).to(**here), prompt_embeds])
        pooled = torch.cat([_repeat(neg_pooled, n).to(**here), pooled])
        time_ids = torch.cat([time_ids, time_ids])  # negative_add_time_ids = add_time_ids
    time_ids = time_ids.to(here["device"]).repeat(n, 1)
    return unet_loop(
        bundle,
        prompt_embeds,
        {"text_embeds": pooled, "time_ids": time_ids},
        do_cfg=do_cfg,
        set_begin_index=True,
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        n=n,
        on_step=on_step,
        should_stop=should_stop,
    )
