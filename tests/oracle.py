"""The correctness oracle: diffusers' own pipeline output, and the comparison the mesh must pass
(<= 1 level apart, >= 99% of pixels identical)."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image


def reference_images(
    pipe,
    *,
    prompt: str,
    negative_prompt: str = "",
    width: int,
    height: int,
    steps: int,
    guidance: float,
    seed: int,
    n: int = 1,
    output_type: str = "pil",
) -> list:
    """`StableDiffusion3Pipeline` with the same parameters the mesh receives, seeded the same way."""
    return pipe(
        prompt=prompt,
        negative_prompt=negative_prompt,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        num_images_per_prompt=n,
        output_type=output_type,
    ).images


def png_to_array(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def assert_images_match(got: np.ndarray, want: np.ndarray | Image.Image) -> None:
    want = np.asarray(want.convert("RGB")) if isinstance(want, Image.Image) else want
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    identical = float((diff == 0).mean())
    assert diff.max() <= 1, f"max pixel difference {diff.max()} > 1"
    assert identical >= 0.99, f"only {identical:.2%} of pixels identical"
