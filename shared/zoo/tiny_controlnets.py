"""Tiny ControlNets, one per family, cached in `tiny-controlnets-v1/<model id>/`.

Built as diffusers' `from_transformer` builds them (the ControlNet's embedders and first
joint block copied from the family's base transformer), with two deliberate differences:

* No extra conditioning channel: `SD3ControlNetModel.from_transformer` adds one by default
  (for inpainting masks), but the text-to-image ControlNet pipelines feed 16-channel VAE
  latents, so the config is built explicitly with `extra_conditioning_channels=0`.
* Random output layers: ControlNets start with zero-initialised output projections and a
  zero input embedder, so an untrained one adds exactly nothing, and a test comparing the
  mesh with the pipeline could not fail on any ControlNet bug. We re-seed those layers so
  the ControlNet visibly changes the image.

The SD3 ControlNet is InstantX-style (`force_zeros_for_pooled_projection=True`), the
SD3.5-Large one Stability-style (`False`): see `FamilyDescriptor.control_latents_shifted`.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from shared.zoo.families import FAMILIES
from shared.zoo.tiny import SEEDS as SD3_SEEDS
from shared.zoo.tiny import build_once, build_sd3_transformer, seeded

DIR_NAME = "tiny-controlnets-v1"
SEEDS = {"sd3-controlnet": 1009, "sd35-large-controlnet": 1010, "flux-controlnet": 1011}
# Gains on the re-seeded layers (default nn.Linear/Conv2d init times these): the control
# image's embedding must be strong enough to steer the residuals (else the ControlNet adds
# a near-constant offset), the residuals strong enough to change the image visibly, weak
# enough that the prompt still matters.
INPUT_GAIN = 4.0
OUTPUT_GAIN = 0.5


def _randomize(modules: list[Any], gain: float) -> None:
    import torch

    with torch.no_grad():
        for module in modules:
            module.reset_parameters()
            for p in module.parameters():
                p.mul_(gain)


def _init_kwargs(cls: type, config: Any) -> dict[str, Any]:
    params = inspect.signature(cls).parameters
    return {k: v for k, v in dict(config).items() if k in params}


def _build_sd3_family(transformer: Any, seed: int, *, force_zeros_for_pooled_projection: bool):
    from diffusers import SD3ControlNetModel

    config = _init_kwargs(SD3ControlNetModel, transformer.config) | {
        "num_layers": 1,
        "extra_conditioning_channels": 0,
        "force_zeros_for_pooled_projection": force_zeros_for_pooled_projection,
    }
    with seeded(seed):
        cn = SD3ControlNetModel(**config)
        cn.pos_embed.load_state_dict(transformer.pos_embed.state_dict())
        cn.time_text_embed.load_state_dict(transformer.time_text_embed.state_dict())
        cn.context_embedder.load_state_dict(transformer.context_embedder.state_dict())
        cn.transformer_blocks.load_state_dict(transformer.transformer_blocks.state_dict(), strict=False)
        _randomize([cn.pos_embed_input.proj], INPUT_GAIN)
        _randomize(list(cn.controlnet_blocks), OUTPUT_GAIN)
    return cn.eval()


def _build_flux(transformer: Any, seed: int):
    from diffusers import FluxControlNetModel

    config = _init_kwargs(FluxControlNetModel, transformer.config) | {"num_layers": 1, "num_single_layers": 1}
    with seeded(seed):
        cn = FluxControlNetModel(**config)
        cn.pos_embed.load_state_dict(transformer.pos_embed.state_dict())
        cn.time_text_embed.load_state_dict(transformer.time_text_embed.state_dict())
        cn.context_embedder.load_state_dict(transformer.context_embedder.state_dict())
        cn.x_embedder.load_state_dict(transformer.x_embedder.state_dict())
        cn.transformer_blocks.load_state_dict(transformer.transformer_blocks.state_dict(), strict=False)
        cn.single_transformer_blocks.load_state_dict(transformer.single_transformer_blocks.state_dict(), strict=False)
        _randomize([cn.controlnet_x_embedder], INPUT_GAIN)
        _randomize([*cn.controlnet_blocks, *cn.controlnet_single_blocks], OUTPUT_GAIN)
    return cn.eval()


def build_controlnet(model_id: str):
    """Build one tiny ControlNet in memory (deterministic: same weights in every process)."""
    from shared.zoo import tiny_flux, tiny_sd35

    seed = SEEDS[model_id]
    if model_id == "sd3-controlnet":
        base = build_sd3_transformer(SD3_SEEDS["sd3-transformer"])
        return _build_sd3_family(
            base, seed, force_zeros_for_pooled_projection=not FAMILIES["sd3"].control_latents_shifted
        )
    if model_id == "sd35-large-controlnet":
        base = tiny_sd35.build_transformer()
        shifted = FAMILIES["sd35-large"].control_latents_shifted
        return _build_sd3_family(base, seed, force_zeros_for_pooled_projection=not shifted)
    if model_id == "flux-controlnet":
        return _build_flux(tiny_flux.build_transformer(), seed)
    raise ValueError(f"no tiny ControlNet {model_id!r}; known: {', '.join(SEEDS)}")


def ensure_dir(cache_dir: str | os.PathLike[str], model_id: str) -> Path:
    if model_id not in SEEDS:
        raise ValueError(f"no tiny ControlNet {model_id!r}; known: {', '.join(SEEDS)}")

    def build(tmp: Path) -> None:
        build_controlnet(model_id).save_pretrained(tmp, safe_serialization=True)

    final = Path(cache_dir).expanduser() / DIR_NAME / model_id
    return build_once(final, build, {"name": f"{DIR_NAME}/{model_id}", "seed": SEEDS[model_id]})
