"""The tiny SD3.5-Large-style transformer and its scheduler, cached in `tiny-sd35-large-v1/`.

Why only these two: SD3.5-Large shares its text encoders (CLIP-L, CLIP-G, T5) and its VAE
with SD3, so the family directory holds just what differs, in diffusers' layout
(`transformer/`, `scheduler/`); the shared models are read from `tiny-sd3-v1/`.

What makes it SD3.5-Large rather than SD3: RMS-normalised queries and keys (`qk_norm`),
no dual-attention layers (those are SD3.5-Medium's), a larger positional grid. The
prompt-facing widths equal SD3's, so the same encoders feed it.
"""

from __future__ import annotations

import os
from pathlib import Path

from shared.zoo.tiny import build_once, build_sd3_transformer

DIR_NAME = "tiny-sd35-large-v1"
SEEDS = {"sd35-large-transformer": 1006}
TRANSFORMER_OPTIONS = {
    "sample_size": 128,
    "pos_embed_max_size": 192,  # as SD3.5-Large
    "qk_norm": "rms_norm",
    "dual_attention_layers": (),
}


def build_transformer():
    return build_sd3_transformer(SEEDS["sd35-large-transformer"], **TRANSFORMER_OPTIONS)


def build_scheduler():
    """FlowMatchEulerDiscreteScheduler as SD3.5 ships it (static shift 3.0, 1000 steps)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def ensure_dir(cache_dir: str | os.PathLike[str]) -> Path:
    def build(tmp: Path) -> None:
        build_transformer().save_pretrained(tmp / "transformer", safe_serialization=True)
        build_scheduler().save_pretrained(tmp / "scheduler")

    return build_once(Path(cache_dir).expanduser() / DIR_NAME, build, {"name": DIR_NAME, "seeds": SEEDS})
