"""The tiny Flux.1-dev-style transformer, its VAE and scheduler, cached in `tiny-flux-v1/`.

Why these widths: Flux reads the shared text encoders, so its `joint_attention_dim` is the
shared T5's width (96) and its `pooled_projection_dim` is CLIP-L's width (32: Flux takes
CLIP's unprojected pooler output). The latent has 16 channels packed in 2x2 patches, so
`in_channels` is 64. `guidance_embeds=True` makes it guidance-distilled like Flux.1-dev.
The rotary axes (4, 6, 6) sum to the head dimension (16), as Flux's (16, 56, 56) sum to 128.

The VAE has Flux's latent scaling (0.3611, shift 0.1159) and 4 blocks (the real 8x), in
the same small widths as the SD3 VAE; the scheduler shifts its sigmas by image size
(`use_dynamic_shifting`) with the base/max values Flux.1-dev ships.
"""

from __future__ import annotations

import os
from pathlib import Path

from shared.zoo.tiny import CLIP_L_WIDTH, T5_WIDTH, build_once, build_vae, seeded

DIR_NAME = "tiny-flux-v1"
SEEDS = {"flux-transformer": 1007, "flux-vae": 1008}
FLUX_SCALING_FACTOR = 0.3611
FLUX_SHIFT_FACTOR = 0.1159


def build_transformer():
    from diffusers import FluxTransformer2DModel

    with seeded(SEEDS["flux-transformer"]):
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels x 2x2 packing
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=T5_WIDTH,
            pooled_projection_dim=CLIP_L_WIDTH,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ).eval()


def build_flux_vae():
    return build_vae(SEEDS["flux-vae"], scaling_factor=FLUX_SCALING_FACTOR, shift_factor=FLUX_SHIFT_FACTOR)


def build_scheduler():
    """FlowMatchEulerDiscreteScheduler as Flux.1-dev ships it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def ensure_dir(cache_dir: str | os.PathLike[str]) -> Path:
    def build(tmp: Path) -> None:
        build_transformer().save_pretrained(tmp / "transformer", safe_serialization=True)
        build_flux_vae().save_pretrained(tmp / "vae", safe_serialization=True)
        build_scheduler().save_pretrained(tmp / "scheduler")

    return build_once(Path(cache_dir).expanduser() / DIR_NAME, build, {"name": DIR_NAME, "seeds": SEEDS})
