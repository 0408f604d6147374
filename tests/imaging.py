"""Helpers to compare images the way the oracle demands: <= 1 level apart, >= 99% identical."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def png_to_array(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def assert_images_match(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    identical = float((diff == 0).mean())
    assert diff.max() <= 1, f"max pixel difference {diff.max()} > 1"
    assert identical >= 0.99, f"only {identical:.2%} of pixels identical"
