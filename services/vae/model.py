"""The VAE service's jobs: latents to pixels (end of every pipeline), a control image to the
latents a ControlNet takes (step 3 of the ControlNet pipelines), and an edit's image (with its
mask when inpainting) to the latents the img2img / inpaint pipelines start from.

Why uint8 (n, H, W, 3) and not PIL: that is exactly the array `VaeImageProcessor.numpy_to_pil`
builds before wrapping it in PIL images, so the mesh can compare, encode or ship it without
a PIL round-trip, and `PIL.Image.fromarray(out[i])` equals the pipeline's image i. Control
images arrive the same way, as uint8 (H, W, 3).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class EditImage:
    """One edit's input, preprocessed as the img2img / inpaint pipelines preprocess it: `image`
    (1, 3, H, W) float32 in [-1, 1] at the requested size, the request `seed` its latents are
    sampled with, and `mask` (1, 1, h, w) float32, 1 where the image is repainted, at the
    latents' size (None: image-to-image)."""

    image: torch.Tensor
    seed: int
    mask: torch.Tensor | None = None


def _edit_processors(bundle: VaeBundle, packed: bool) -> tuple[VaeImageProcessor, VaeImageProcessor]:
    """The pipelines' `image_processor` and `mask_processor` (Flux's round to 16: 8 x its 2x2 packing)."""
    factor = _scale_factor(bundle) * (2 if packed else 1)
    channels = bundle.vae.config.latent_channels
    image = VaeImageProcessor(vae_scale_factor=factor, vae_latent_channels=channels)
    mask = VaeImageProcessor(
        vae_scale_factor=factor,
        vae_latent_channels=channels,
        do_normalize=False,
        do_binarize=True,
        do_convert_grayscale=True,
    )
    return image, mask


def prepare_edit(
    bundle: VaeBundle, pixels: torch.Tensor, mask: torch.Tensor | None, params: VaeEncodeParams
) -> EditImage:
    """An edit's image (uint8 (H', W', 3), any size) and mask (uint8 (H', W'), 255 where the
    image is repainted, diffusers' convention) as the pipelines prepare them: both resized to
    params.height x params.width by the pipeline's processors (`preprocess`), the mask binarised
    and brought to the latents' size by `prepare_mask_latents`' nearest interpolation."""
    from PIL import Image

    if pixels.ndim != 3 or pixels.shape[-1] != 3 or pixels.dtype != torch.uint8:
        raise ValueError(f"an edit's image must be uint8 (H, W, 3), got {pixels.dtype} {tuple(pixels.shape)}")
    desc = family_descriptor(params.family)
    image_processor, mask_processor = _edit_processors(bundle, desc.packs_latents)
    h, w = params.height, params.width
    image = image_processor.preprocess(Image.fromarray(pixels.cpu().numpy()), height=h, width=w)
    if mask is None:
        return EditImage(image=image.to(torch.float32), seed=params.seed)
    if mask.ndim != 2 or mask.dtype != torch.uint8 or tuple(mask.shape) != tuple(pixels.shape[:2]):
        raise ValueError(
            f"an edit's mask must be uint8 (H, W) of the image's size {tuple(pixels.shape[:2])}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    condition = mask_processor.preprocess(Image.fromarray(mask.cpu().numpy()), height=h, width=w)
    scale = _scale_factor(bundle)
    if desc.packs_latents:  # FluxInpaintPipeline: latents' sides even, for the 2x2 packing
        size = (2 * (h // (scale * 2)), 2 * (w // (scale * 2)))
    else:
        size = (h // scale, w // scale)
    # Contiguous, as it arrives over the tensor plane: the layout of what the mask is blended
    # into decides the layout of the latents the UNet then takes, and so its rounding.
    latent_mask = torch.nn.functional.interpolate(condition, size=size).contiguous()
    return EditImage(image=image.to(torch.float32), seed=params.seed, mask=latent_mask)


def encode_edits(bundle: VaeBundle, items: list[EditImage]) -> list[dict[str, torch.Tensor]]:
    """Edits' images (all of one size) to their image latents in one VAE call, each sampled with
    its own request's generator, as the pipelines' `_encode_vae_image`: `latent_dist.sample(
    torch.Generator("cpu").manual_seed(seed))`, then `(sample - shift_factor) * scaling_factor`
    (shift 0 for VAEs without one: SD1.5's and SDXL's `scaling_factor * sample`).
    Returns per item {"latents": (1, C, H/8, W/8)} (unpacked, in the VAE's dtype), with its
    "mask" (1, 1, h, w) when it has one. The sample is the first draw from the request's
    generator: the denoiser, knowing this, advances its own generator past the same draw.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    vae = bundle.vae
    device = next(vae.parameters()).device
    shift = vae.config.shift_factor or 0.0
    images = torch.cat([item.image for item in items]).to(device=device, dtype=vae.dtype)
    out: list[dict[str, torch.Tensor]] = []
    with torch.inference_mode():
        parameters = vae.encode(images).latent_dist.parameters
        for i, item in enumerate(items):
            dist = DiagonalGaussianDistribution(parameters[i : i + 1])
            sample = dist.sample(torch.Generator("cpu").manual_seed(item.seed))
            # Contiguous, as the tensor plane carries it (the denoiser lays it out as its pipeline does).
            result = {"latents": ((sample - shift) * vae.config.scaling_factor).contiguous()}
            if item.mask is not None:
                result["mask"] = item.mask
            out.append(result)
    return out
