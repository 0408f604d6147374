"""A ControlNet's forward pass for the adapters service, as the ControlNet pipelines call it.

Why a function of plain dicts: the denoiser runs the loop and, at each step, sends the
ControlNet what the pipeline would pass it (see `services.denoiser.loop.ControlSpec`:
`constant` tensors fixed for the request, `varying` per-step tensors, scalar `params`);
this function turns them into the exact call of `StableDiffusion3ControlNetPipeline` /
`FluxControlNetPipeline` step 8 / 7 and names the residuals it returns: "block_0".. and,
for Flux, "single_0"... In-process,
`ControlSpec(residuals=lambda c, v, p: controlnet_residuals(cn_bundle, c, v, p))`
reproduces the pipeline bit for bit.
"""

from __future__ import annotations

import torch

from shared.zoo import ControlNetBundle
from shared.zoo.families import family

# Inputs that meet the ControlNet's weights directly: in its dtype, should the denoiser run in
# another. Timesteps, guidance and position ids are left as sent: the model casts those itself.
_WEIGHT_INPUTS = frozenset({"hidden_states", "prompt_embeds", "pooled_projections", "controlnet_cond"})


def _here(name: str, t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return t.to(device=device, dtype=dtype) if name in _WEIGHT_INPUTS else t.to(device)


def _named(prefix: str, samples) -> dict[str, torch.Tensor]:
    return {f"{prefix}_{i}": s for i, s in enumerate(samples or ())}


def _sd3_residuals(cn, c: dict[str, torch.Tensor], v: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """StableDiffusion3ControlNetPipeline's ControlNet call (`SD3ControlNetModel`)."""
    cfg = cn.config
    pooled = c["pooled_projections"]
    if cfg.force_zeros_for_pooled_projection:
        pooled = torch.zeros_like(pooled)
    blocks = cn(
        hidden_states=v["hidden_states"],
        timestep=v["timestep"],
        encoder_hidden_states=c["prompt_embeds"] if cfg.joint_attention_dim is not None else None,
        pooled_projections=pooled,
        joint_attention_kwargs=None,
        controlnet_cond=c["controlnet_cond"],
        conditioning_scale=scale,
        return_dict=False,
    )[0]
    return _named("block", blocks)


def _flux_residuals(
    cn, c: dict[str, torch.Tensor], v: dict[str, torch.Tensor], scale: float
) -> dict[str, torch.Tensor]:
    """FluxControlNetPipeline's ControlNet call (`FluxControlNetModel`)."""
    blocks, singles = cn(
        hidden_states=v["hidden_states"],
        controlnet_cond=c["controlnet_cond"],
        controlnet_mode=None,
        conditioning_scale=scale,
        timestep=v["timestep"],
        guidance=c["guidance"] if cn.config.guidance_embeds else None,
        pooled_projections=c["pooled_projections"],
        encoder_hidden_states=c["prompt_embeds"],
        txt_ids=c["txt_ids"],
        img_ids=c["img_ids"],
        joint_attention_kwargs={},
        return_dict=False,
    )
    return _named("block", blocks) | _named("single", singles)


# The ControlNet call of each ControlNet class a family names (`FamilyDescriptor.controlnet_class`).
_RESIDUALS_OF_CLASS = {"SD3ControlNetModel": _sd3_residuals, "FluxControlNetModel": _flux_residuals}


def controlnet_residuals(
    bundle: ControlNetBundle,
    constant: dict[str, torch.Tensor],
    varying: dict[str, torch.Tensor],
    params: dict[str, float | int],
) -> dict[str, torch.Tensor]:
    """One ControlNet forward: {"block_i": residual, ...} (+ {"single_i": ...} for Flux).

    sd3 / sd35-large: constant {"prompt_embeds", "pooled_projections", "controlnet_cond"},
    varying {"hidden_states", "timestep"}. As the pipeline: a ControlNet with
    `force_zeros_for_pooled_projection` gets zeros instead of the pooled prompt, one without a
    context embedder (`joint_attention_dim=None`, SD3.5's official ones) no prompt embeddings.
    flux: constant also {"txt_ids", "img_ids", "guidance"}, varying "timestep" already
    divided by 1000; `guidance` is used only by a ControlNet with `guidance_embeds`.
    params: {"conditioning_scale"} (others are ignored).
    """
    cn = bundle.controlnet
    controlnet_class = family(bundle.family).controlnet_class
    residuals = _RESIDUALS_OF_CLASS.get(controlnet_class or "")
    if residuals is None:
        raise ValueError(f"{bundle.model_id}: no ControlNet call for {controlnet_class} (family {bundle.family})")
    device = next(cn.parameters()).device
    c = {k: _here(k, t, device, cn.dtype) for k, t in constant.items()}
    v = {k: _here(k, t, device, cn.dtype) for k, t in varying.items()}
    with torch.inference_mode():
        return residuals(cn, c, v, float(params["conditioning_scale"]))
