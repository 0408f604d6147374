"""The VAE service's two jobs: latents to pixels (end of every pipeline), and a control image
to the latents a ControlNet takes (step 3 of the ControlNet pipelines).

Why uint8 (n, H, W, 3) and not PIL: that is exactly the array `VaeImageProcessor.numpy_to_pil`
builds before wrapping it in PIL images, so the mesh can compare, encode or ship it without
a PIL round-trip, and `PIL.Image.fromarray(out[i])` equals the pipeline's image i. Control
images arrive the same way, as uint8 (H, W, 3).
"""

from __future__ import annotations

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

from shared.messages import VaeEncodeParams
from shared.zoo import VaeBundle
from shared.zoo.families import family as family_descriptor


def _scale_factor(bundle: VaeBundle) -> int:
    return 2 ** (len(bundle.vae.config.block_out_channels) - 1)


def decode(bundle: VaeBundle, latents: torch.Tensor) -> torch.Tensor:
    """Decode final denoiser latents (n, C, h, w) into uint8 RGB images (n, 8h, 8w, 3) on the CPU.

    Works for every family: SD3's and Flux's pipelines both decode `latents / scaling_factor
    + shift_factor` (Flux after unpacking, which the denoiser has done), with the factors
    read from the VAE's config; SD1.5's VAE has no shift factor (None) and its pipeline
    decodes `latents / scaling_factor` (no NSFW check: every image is denormalised).
    """
    vae = bundle.vae
    device = next(vae.parameters()).device
    processor = VaeImageProcessor(vae_scale_factor=_scale_factor(bundle))
    shift = vae.config.shift_factor
    with torch.inference_mode():
        scaled = latents.to(device=device, dtype=vae.dtype) / vae.config.scaling_factor
        if shift is not None:
            scaled = scaled + shift
        image = vae.decode(scaled, return_dict=False)[0]
        image_np = processor.postprocess(image, output_type="np")
    pixels = (image_np * 255).round().astype("uint8")  # as VaeImageProcessor.numpy_to_pil
    return torch.from_numpy(pixels)


def encode_control_image(
    bundle: VaeBundle,
    pixels: torch.Tensor,
    params: VaeEncodeParams,
) -> torch.Tensor:
    """A control image (uint8 (H, W, 3)) to the ControlNet's `controlnet_cond`, as the pipeline makes it.

    As `StableDiffusion3ControlNetPipeline` / `FluxControlNetPipeline` step 3: the image (as
    PIL) is resized to height x width and normalised by `image_processor.preprocess`, repeated
    `params.n` times (and, for sd3/sd35-large with guidance_scale > 1, doubled for
    classifier-free guidance), encoded, sampled from the latent distribution, then
    `(sample - shift) * scaling_factor` (shift 0 for sd3's InstantX-style ControlNets, see
    `FamilyDescriptor.control_latents_shifted`); Flux's are then packed 2x2.
    Returns sd3/sd35-large (n or 2n, 16, H/8, W/8); flux (n, H/16 * W/16, 64).

    The sample is drawn from `torch.Generator("cpu").manual_seed(params.seed)`:
    * flux: the pipeline samples with the request's generator, which then also draws the
      initial noise; the denoiser, knowing this, advances its generator past the same draw.
    * sd3/sd35-large: the pipeline calls `latent_dist.sample()` WITHOUT a generator, i.e. from
      torch's global RNG. The mesh seeds it from the request seed; a reference run matches
      when `torch.manual_seed(seed)` is called just before the pipeline call.
    """
    desc = family_descriptor(params.family)
    if desc.control_latents_shifted is None:
        raise ValueError(f"family {params.family!r} has no ControlNet, so no control latents")
    if pixels.ndim != 3 or pixels.shape[-1] != 3 or pixels.dtype != torch.uint8:
        raise ValueError(f"a control image must be uint8 (H, W, 3), got {pixels.dtype} {tuple(pixels.shape)}")
    from PIL import Image

    vae = bundle.vae
    device = next(vae.parameters()).device
    packed = desc.packs_latents
    # FluxControlNetPipeline's image processor rounds sizes to 16 (8 x the 2x2 packing); SD3's to 8.
    processor = VaeImageProcessor(vae_scale_factor=_scale_factor(bundle) * (2 if packed else 1))
    image = processor.preprocess(Image.fromarray(pixels.cpu().numpy()), height=params.height, width=params.width)
    image = image.repeat_interleave(params.n, dim=0).to(device=device, dtype=vae.dtype)
    if desc.cfg and params.guidance_scale > 1:
        image = torch.cat([image] * 2)
    shift = vae.config.shift_factor if desc.control_latents_shifted else 0
    generator = torch.Generator("cpu").manual_seed(params.seed)
    with torch.inference_mode():
        latents = vae.encode(image).latent_dist.sample(generator)
        latents = (latents - shift) * vae.config.scaling_factor
        if packed:
            n, c, h, w = latents.shape
            latents = FluxPipeline._pack_latents(latents, n, c, h, w)
    return latents
