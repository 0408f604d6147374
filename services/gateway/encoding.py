"""The images a request returns, encoded in the format it asked for.

Why a choice: PNG is lossless but slow to write. At 1024x1024 it takes about 15 ms for a smooth
image and 100-200 ms for a noisy one (what random weights draw) on one core: on an H100 it was
the largest cost the mesh added to a request (bench/RESULTS.md). A JPEG takes about 12 ms
whatever the image, and is a fraction of the size.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

from services.gateway.errors import APIError
from shared.tensor_plane import RawTensor

OutputFormat = Literal["png", "jpeg", "webp"]
DEFAULT_QUALITY = 90
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


@dataclass(frozen=True)
class ImageEncoding:
    """How to write the images: the format, and the quality of the lossy ones (1-100)."""

    format: OutputFormat = "png"
    quality: int = DEFAULT_QUALITY


def encode_images(images: RawTensor, encoding: ImageEncoding) -> list[bytes]:
    """(n, H, W, 3) uint8 -> one encoded image each. Runs in a thread: it is CPU work (Pillow
    lets go of the GIL while it encodes)."""
    from PIL import Image

    array = images.to_numpy()
    if array.ndim != 4 or array.shape[-1] != 3:
        raise APIError(502, "bad_output", f"the VAE returned images of shape {array.shape}, expected (n, H, W, 3)")
    options: dict[str, int] = {"compress_level": 1} if encoding.format == "png" else {"quality": encoding.quality}
    out = []
    for img in array:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=_PIL_FORMAT[encoding.format], **options)
        out.append(buf.getvalue())
    return out
