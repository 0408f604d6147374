"""Latents to pixels for the vae service, as the end of `StableDiffusion3Pipeline.__call__`.

Why uint8 (n, H, W, 3) and not PIL: that is exactly the array `VaeImageProcessor.numpy_to_pil`
builds before wrapping it in PIL images, so the mesh can compare, encode or ship it without
a PIL round-trip, and `PIL.Image.fromarray(out[i])` equals the pipeline's image i.
"""

from __future__ import annotations

import torch
from diffusers.image_processor import VaeImageProcessor

from shared.zoo import VaeBundle


def decode(bundle: VaeBundle, latents: torch.Tensor) -> torch.Tensor:
    """Decode final denoiser latents (n, C, h, w) into uint8 RGB images (n, 8h, 8w, 3) on the CPU."""
    vae = bundle.vae
    device = next(vae.parameters()).device
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor)
    with torch.inference_mode():
        scaled = (latents.to(device) / vae.config.scaling_factor) + vae.config.shift_factor
        image = vae.decode(scaled, return_dict=False)[0]
        image_np = processor.postprocess(image, output_type="np")
    pixels = (image_np * 255).round().astype("uint8")  # as VaeImageProcessor.numpy_to_pil
    return torch.from_numpy(pixels)
