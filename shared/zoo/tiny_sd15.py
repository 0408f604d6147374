"""The tiny SD1.5 pipeline (CLIP text encoder, UNet, 4-channel VAE, PNDM), cached in `tiny-sd15-v1/`.

Why a whole pipeline directory: SD1.5 shares no model with the transformer families (see
`registry`), so its directory is a plain `StableDiffusionPipeline.save_pretrained` one, the
layout of a real SD1.5 checkout: the services load `text_encoder/`, `tokenizer/`, `unet/`,
`vae/` and `scheduler/` from it, and the reference pipeline is `from_pretrained` on it.

What makes it SD1.5 at a small size: the real classes (`CLIPTextModel` read for its last
hidden state, `UNet2DConditionModel` with SD1.5's block types: three cross-attention down
blocks and a plain one, mirrored up), the UNet's `cross_attention_dim` equal to the text
encoder's width, a VAE with 4 latent channels, quant convs, `scaling_factor` 0.18215 and no
shift factor, and the scheduler SD1.5 ships (PNDM, PLMS steps only, scaled-linear betas).
"""

from __future__ import annotations

import os
from pathlib import Path

from shared.zoo.tiny import build_clip, build_once, build_vae, seeded

DIR_NAME = "tiny-sd15-v1"
SEEDS = {"sd15-clip": 1009, "sd15-unet": 1010, "sd15-vae": 1011}
CLIP_WIDTH = 32
SCALING_FACTOR = 0.18215


def build_text_encoder(tokenizer):
    return build_clip(CLIP_WIDTH, SEEDS["sd15-clip"], tokenizer, with_projection=False)


def build_unet():
    from diffusers import UNet2DConditionModel

    with seeded(SEEDS["sd15-unet"]):
        return UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(16, 32, 32, 32),  # 4 levels as SD1.5's (320, 640, 1280, 1280)
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=CLIP_WIDTH,
            attention_head_dim=4,
        ).eval()


def build_sd15_vae():
    return build_vae(
        SEEDS["sd15-vae"],
        scaling_factor=SCALING_FACTOR,
        shift_factor=None,
        latent_channels=4,
        use_quant_conv=True,
        use_post_quant_conv=True,
    )


def build_scheduler():
    """PNDMScheduler as the SD1.5 repository's scheduler_config.json has it."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )


def build_pipeline():
    """The whole tiny SD1.5 pipeline in memory, no safety checker (deterministic weights)."""
    from diffusers import StableDiffusionPipeline

    from shared.zoo.tokenizers import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    return StableDiffusionPipeline(
        vae=build_sd15_vae(),
        text_encoder=build_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=build_unet(),
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def ensure_dir(cache_dir: str | os.PathLike[str]) -> Path:
    def build(tmp: Path) -> None:
        build_pipeline().save_pretrained(tmp, safe_serialization=True)

    return build_once(Path(cache_dir).expanduser() / DIR_NAME, build, {"name": DIR_NAME, "seeds": SEEDS})
