"""Weights' dtype (LEGO_DTYPE): bf16 serving gives diffusers' own bf16 pipeline's image.

Why it matters: on a GPU the models are served in bfloat16 (half the memory of float32); the
mesh must then still be the pipeline, and services whose dtypes differ must still connect.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import dataclasses

import numpy as np
import pytest
import torch

from baseline.pipelines import build_reference_pipeline
from services.denoiser.denoise import denoise
from services.denoiser.loop import DenoiseInputs
from services.encoder.model import encode
from services.vae.model import decode
from shared.settings import Settings
from shared.zoo import load_denoiser, load_text_encoder, load_vae
from shared.zoo.dtypes import model_dtype

KW = {"height": 64, "width": 64, "num_inference_steps": 3, "guidance_scale": 5.0, "seed": 5, "n": 1}
PROMPT, NEGATIVE = "a lighthouse at dusk", "blurry"


def _chain(encoders: Settings, rest: Settings) -> torch.Tensor:
    texts = [PROMPT, NEGATIVE]
    enc = {m: encode(load_text_encoder(m, encoders), texts) for m in ("clip-l", "clip-g")}
    t5 = encode(load_text_encoder("t5", encoders), texts, max_sequence_length=256)
    tensors = {
        "clip_l_embeds": enc["clip-l"]["embeds"],
        "clip_l_pooled": enc["clip-l"]["pooled"],
        "clip_g_embeds": enc["clip-g"]["embeds"],
        "clip_g_pooled": enc["clip-g"]["pooled"],
        "t5_embeds": t5["embeds"],
    }
    latents = denoise(load_denoiser("sd3-transformer", rest), DenoiseInputs(tensors, **KW))
    return decode(load_vae("sd3-vae", rest), latents)


def test_dtype_resolution() -> None:
    assert model_dtype(Settings(device="cpu")) == torch.float32
    assert model_dtype(Settings(device="cuda")) == torch.bfloat16
    assert model_dtype(Settings(device="cuda:1", dtype="float16")) == torch.float16
    assert model_dtype(Settings(device="cpu", dtype="bf16")) == torch.bfloat16
    with pytest.raises(ValueError, match="LEGO_DTYPE='int8'"):
        model_dtype(Settings(dtype="int8"))


def test_loaders_honour_dtype(settings: Settings) -> None:
    bf16 = dataclasses.replace(settings, dtype="bfloat16")
    assert load_text_encoder("t5", bf16).model.dtype == torch.bfloat16
    assert load_denoiser("sd3-transformer", bf16).transformer.dtype == torch.bfloat16
    assert load_vae("sd3-vae", bf16).vae.dtype == torch.bfloat16
    auto = dataclasses.replace(settings, dtype="auto")
    assert load_denoiser("sd3-transformer", auto).transformer.dtype == (
        torch.bfloat16 if auto.device.startswith("cuda") else torch.float32
    )


def test_bf16_chain_equals_bf16_pipeline(settings: Settings) -> None:
    bf16 = dataclasses.replace(settings, dtype="bfloat16")
    got = _chain(bf16, bf16).numpy()
    pipe = build_reference_pipeline(bf16)
    assert pipe.transformer.dtype == torch.bfloat16
    want = np.asarray(
        pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            height=KW["height"],
            width=KW["width"],
            num_inference_steps=KW["num_inference_steps"],
            guidance_scale=KW["guidance_scale"],
            generator=torch.Generator("cpu").manual_seed(KW["seed"]),
        )
        .images[0]
        .convert("RGB")
    )
    assert np.array_equal(got[0], want)
    # bf16 really ran: the float32 chain draws a (slightly) different image.
    fp32 = dataclasses.replace(settings, dtype="float32")
    assert not np.array_equal(_chain(fp32, fp32).numpy()[0], want)


def test_float32_encoders_feed_a_bf16_denoiser(settings: Settings) -> None:
    """Services configured apart (encoders on a CPU host in float32, the rest in bf16) still connect."""
    pixels = _chain(dataclasses.replace(settings, dtype="float32"), dataclasses.replace(settings, dtype="bfloat16"))
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 64, 64, 3) and pixels.float().std() > 5
