"""The correctness oracle: diffusers' own pipeline output, and the comparison the mesh must pass
(<= 1 level apart, >= 99% of pixels identical).

`reference_images` calls any of the four reference pipelines (`StableDiffusion3Pipeline`,
`StableDiffusion3ControlNetPipeline`, `FluxPipeline`, `FluxControlNetPipeline`) with the
parameters the mesh receives, seeded the way the mesh seeds its steps.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image


def _is_flux(pipe) -> bool:
    return type(pipe).__name__.startswith("Flux")


def pipeline_negative_prompt(pipe, negative_prompt: str) -> str | None:
    """The pipeline's argument for the request's negative prompt: the text, except that SDXL's
    pipeline zeros the negative embeddings (`force_zeros_for_empty_prompt`) only for None, which
    is what the mesh's empty negative prompt means for sdxl."""
    if type(pipe).__name__.startswith("StableDiffusionXL") and not negative_prompt:
        return None
    return negative_prompt


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
    control_image: np.ndarray | torch.Tensor | Image.Image | None = None,
    conditioning_scale: float = 1.0,
) -> list:
    """The pipeline's images for the parameters the mesh receives, seeded as the mesh seeds them.

    Flux pipelines get no negative prompt (no true CFG) and T5's 512 tokens, as the mesh's
    flux workflows. With a control image on an SD3-family pipeline, torch's global RNG is
    seeded with `seed` just before the call: `StableDiffusion3ControlNetPipeline` samples the
    control latents from it (the mesh's VAE service seeds that draw from the request seed).
    """
    kwargs = {
        "prompt": prompt,
        "height": height,
        "width": width,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "generator": torch.Generator("cpu").manual_seed(seed),
        "num_images_per_prompt": n,
        "output_type": output_type,
    }
    if _is_flux(pipe):
        kwargs["max_sequence_length"] = 512
    else:
        kwargs["negative_prompt"] = pipeline_negative_prompt(pipe, negative_prompt)
    if control_image is not None:
        if not isinstance(control_image, Image.Image):
            control_image = Image.fromarray(np.asarray(control_image, dtype=np.uint8))
        kwargs["control_image"] = control_image
        kwargs["controlnet_conditioning_scale"] = conditioning_scale
        if not _is_flux(pipe):
            torch.manual_seed(seed)
    return pipe(**kwargs).images


def png_to_array(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def image_diff(got: np.ndarray, want: np.ndarray | Image.Image) -> tuple[int, float]:
    """(max pixel difference, fraction of identical values)."""
    want = np.asarray(want.convert("RGB")) if isinstance(want, Image.Image) else want
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    return int(diff.max()), float((diff == 0).mean())


def assert_images_match(got: np.ndarray, want: np.ndarray | Image.Image) -> None:
    worst, identical = image_diff(got, want)
    assert worst <= 1, f"max pixel difference {worst} > 1"
    assert identical >= 0.99, f"only {identical:.2%} of pixels identical"
