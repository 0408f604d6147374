"""The tiny SDXL-base-style UNet, its VAE and scheduler, cached in `tiny-sdxl-v1/`.

Why only these three: SDXL's text encoders are the shared `clip-l` (CLIP ViT-L/14) and
`clip-g` (OpenCLIP bigG/14), read from the shared directory exactly as SD3 reads them
(penultimate hidden states; bigG's projected pool), so the tiny widths already fit: the
UNet's `cross_attention_dim` is CLIP-L's width + CLIP-G's (32 + 48 = 80, as 768 + 1280 =
2048), and its `projection_class_embeddings_input_dim` is 6 time ids x
`addition_time_embed_dim` + CLIP-G's projection (6 x 8 + 48 = 96, as 6 x 256 + 1280 = 2816).

What makes it SDXL at a small size: the real classes (`UNet2DConditionModel` with
`addition_embed_type="text_time"`, SDXL's three levels: a plain down block then two
cross-attention ones with linear projections and deeper transformers at the lower levels,
mirrored up), a 4-channel VAE with quant convs, `scaling_factor` 0.13025, no shift and
`force_upcast` as SDXL's, and the scheduler SDXL-base ships (Euler, "leading" spacing).
"""

from __future__ import annotations

import os
from pathlib import Path

from shared.zoo.tiny import CLIP_G_WIDTH, CLIP_L_WIDTH, build_once, build_vae, seeded

DIR_NAME = "tiny-sdxl-v1"
SEEDS = {"sdxl-unet": 1012, "sdxl-vae": 1013}
ADDITION_TIME_EMBED_DIM = 8
TIME_IDS = 6  # original size (2), crop top-left (2), target size (2)
SCALING_FACTOR = 0.13025
# stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json (keys Euler ignores included)
SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def build_unet():
    from diffusers import UNet2DConditionModel

    with seeded(SEEDS["sdxl-unet"]):
        return UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32, 32),  # 3 levels as SDXL's (320, 640, 1280)
            layers_per_block=1,
            transformer_layers_per_block=(1, 1, 2),  # SDXL: (1, 2, 10)
            attention_head_dim=(2, 4, 4),  # heads per level (diffusers' name), as SDXL's (5, 10, 20)
            norm_num_groups=8,
            use_linear_projection=True,
            cross_attention_dim=CLIP_L_WIDTH + CLIP_G_WIDTH,
            addition_embed_type="text_time",
            addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=TIME_IDS * ADDITION_TIME_EMBED_DIM + CLIP_G_WIDTH,
        ).eval()


def build_sdxl_vae():
    return build_vae(
        SEEDS["sdxl-vae"],
        scaling_factor=SCALING_FACTOR,
        shift_factor=None,
        latent_channels=4,
        use_quant_conv=True,
        use_post_quant_conv=True,
        force_upcast=True,
    )


def build_scheduler():
    """EulerDiscreteScheduler as the SDXL-base repository's scheduler_config.json has it."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)


def ensure_dir(cache_dir: str | os.PathLike[str]) -> Path:
    def build(tmp: Path) -> None:
        build_unet().save_pretrained(tmp / "unet", safe_serialization=True)
        build_sdxl_vae().save_pretrained(tmp / "vae", safe_serialization=True)
        build_scheduler().save_pretrained(tmp / "scheduler")

    return build_once(Path(cache_dir).expanduser() / DIR_NAME, build, {"name": DIR_NAME, "seeds": SEEDS})
