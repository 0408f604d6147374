"""Tiny SD3 models with seeded random weights, cached on disk in diffusers' layout.

(The other families, ControlNets and LoRAs are built by `tiny_sd35`, `tiny_flux`,
`tiny_controlnets` and `tiny_loras` with the helpers here: `seeded`, `build_once`.)

Why: no weights can be downloaded, but the mesh must run the real model classes and be
checked against diffusers' own `StableDiffusion3Pipeline`. Small configs of the real
classes give the same code paths at a fraction of the cost; a fixed seed per model means
every process that builds them gets the same weights. The result is written once with
`save_pretrained` into `<model_cache_dir>/tiny-sd3-v1/` so that all services (and the
reference pipeline) then load it through the one `from_pretrained` path also used for a
real SD3 directory.

Dimensions are chosen so that SD3's prompt layout is exercised for real: CLIP-L (32) and
CLIP-G (48) have different widths, their concatenation (80) is narrower than T5 (96) so it
is zero-padded as in SD3 (2048 -> 4096), and the pooled projections (32 + 48) give the
transformer's `pooled_projection_dim` (80).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TINY_DIR_NAME = "tiny-sd3-v1"
_MARKER = "lego-tiny.json"

# One fixed seed per model: changing one model's config does not change the others' weights.
SEEDS = {"clip-l": 1001, "clip-g": 1002, "t5": 1003, "sd3-transformer": 1004, "sd3-vae": 1005}

CLIP_L_WIDTH = 32
CLIP_G_WIDTH = 48
T5_WIDTH = 96


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a build under a fixed seed without disturbing the caller's global RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_clip(width: int, seed: int, tokenizer, *, with_projection: bool = True):
    """A tiny CLIP text encoder: `CLIPTextModelWithProjection` (SD3's, with the pooled
    projection) or, `with_projection=False`, `CLIPTextModel` (SD1.5's)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=width * 4,
        projection_dim=width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with seeded(seed):
        return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def build_t5(seed: int, tokenizer):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_WIDTH,
        d_kv=24,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with seeded(seed):
        return T5EncoderModel(config).eval()


def build_sd3_transformer(seed: int, **overrides: Any):
    """The tiny SD3 MMDiT; `overrides` turn it into a variant (SD3.5-Large: qk RMS norm)."""
    from diffusers import SD3Transformer2DModel

    config: dict[str, Any] = {
        "sample_size": 32,
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 2,
        "attention_head_dim": 8,
        "num_attention_heads": 4,
        "joint_attention_dim": T5_WIDTH,
        "caption_projection_dim": 32,  # must equal heads * head_dim in SD3's joint blocks
        "pooled_projection_dim": CLIP_L_WIDTH + CLIP_G_WIDTH,
        "pos_embed_max_size": 96,  # as SD3: 96 patches a side, so up to 1536 px (1024 px needs 64)
    }
    with seeded(seed):
        return SD3Transformer2DModel(**(config | overrides)).eval()


def build_vae(seed: int, *, scaling_factor: float = 1.5305, shift_factor: float | None = 0.0609, **overrides: Any):
    """The tiny 16-channel VAE (SD3's latent scaling by default; Flux passes its own, and SD1.5
    its 4 latent channels with quant convs and no shift through `overrides`)."""
    from diffusers import AutoencoderKL

    config: dict[str, Any] = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (16, 32, 32, 32),  # 4 blocks: the real 8x downscale
        "layers_per_block": 1,
        "latent_channels": 16,
        "norm_num_groups": 8,
        "sample_size": 256,
        "scaling_factor": scaling_factor,
        "shift_factor": shift_factor,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }
    with seeded(seed):
        return AutoencoderKL(**(config | overrides)).eval()


def build_tiny_pipeline():
    """Build the whole tiny SD3 pipeline in memory (deterministic: same weights in every process)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from shared.zoo.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    clip_tok = build_clip_tokenizer()
    t5_tok = build_t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=build_sd3_transformer(SEEDS["sd3-transformer"]),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=build_vae(SEEDS["sd3-vae"]),
        text_encoder=build_clip(CLIP_L_WIDTH, SEEDS["clip-l"], clip_tok),
        tokenizer=clip_tok,
        text_encoder_2=build_clip(CLIP_G_WIDTH, SEEDS["clip-g"], clip_tok),
        tokenizer_2=clip_tok,
        text_encoder_3=build_t5(SEEDS["t5"], t5_tok),
        tokenizer_3=t5_tok,
    )


def tiny_dir(cache_dir: str | os.PathLike[str]) -> Path:
    """Where the tiny models live under a cache directory."""
    return Path(cache_dir).expanduser() / TINY_DIR_NAME


def is_built(path: Path) -> bool:
    """A directory counts as built only with its marker, written last before the atomic rename."""
    return (path / _MARKER).is_file()


def ensure_tiny_dir(cache_dir: str | os.PathLike[str]) -> Path:
    """Build the tiny SD3 models into the cache once; reuse them afterwards (see `build_once`)."""

    def build(tmp: Path) -> None:
        build_tiny_pipeline().save_pretrained(tmp, safe_serialization=True)

    return build_once(tiny_dir(cache_dir), build, {"name": TINY_DIR_NAME, "seeds": SEEDS})


def build_once(final: Path, build: Callable[[Path], None], info: dict[str, Any]) -> Path:
    """Run `build(tmp)` into a fresh temporary directory and rename it to `final`, once.

    Safe when several processes start at once: each builds into its own temporary
    directory beside `final` and renames it into place; a loser of the race discards its
    copy and uses the winner's (the copies are identical anyway, thanks to the fixed seeds).
    The marker file `info` is written last, so a directory without it was never finished.
    """
    if is_built(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-", dir=final.parent))
    try:
        build(tmp)
        (tmp / _MARKER).write_text(json.dumps(info, indent=1))
        if final.exists() and not is_built(final):
            # A half-written directory can only come from a non-atomic copy by hand: replace it.
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_built(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
