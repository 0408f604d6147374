"""What differs between model families, in one table: a frozen descriptor per family.

Why a table: the pipeline class, the network class, the scheduler, latent channels, the VAE's
factors, the size multiple, the text encoders and whether guidance is classifier-free or
distilled used to be answered by `family == ...` branches spread over services, the zoo and the
launcher. diffusers keeps such facts in configs; here every "which class / how many / CFG or
not" question reads `FAMILIES[family]`. Adding a family is one row here and one loop module
under `services/denoiser/families/`.

Torch-free on purpose: the gateway validates sizes and the launcher plans processes from this
table without importing diffusers. Classes are named, not imported; `resolve_class` imports
one when a loader needs it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from typing import Any, Literal

Family = Literal["sd3", "sd35-large", "flux", "sd15", "sdxl"]
Guidance = Literal["cfg", "distilled"]


@dataclass(frozen=True)
class EncoderUse:
    """One text encoder a family reads, and how: `outputs` the encoder step returns (None: the
    encoder's default), `max_sequence_length` for T5, `negative` whether it also encodes the
    negative prompt (row 1; guidance-distilled families read the prompt row only)."""

    model_id: str
    outputs: tuple[str, ...] | None = None
    max_sequence_length: int | None = None
    negative: bool = True


@dataclass(frozen=True)
class FamilyDescriptor:
    """Everything family-specific, as data.

    `denoiser_inputs`: the encoder tensors the denoising loop takes, by name (each two rows
    [prompt, negative] for CFG families; row 0 only is read by distilled ones).
    `size_multiple`: what height and width must be multiples of (VAE 8x times the transformer's
    2x2 patch or packing for the MMDiTs; VAE 8x for the UNets, which pad odd sizes themselves).
    `vae_shifted`: the VAE config has a `shift_factor` (SD3, Flux) that decoding adds back.
    `control_latents_shifted`: how the family's ControlNets take control latents (diffusers'
    `force_zeros_for_pooled_projection` says which): encoded with the VAE's shift (True),
    without it (False), or no ControlNet at all (None).
    `packs_latents`: the transformer takes latents packed 2x2 into tokens (Flux), so control
    latents are packed too and sizes round to 16.
    `default_side`: the side its models were trained at (diffusers' default: the network's
    sample_size times the VAE's factor; SD1.5 512, the others 1024): what `size="auto"` draws.
    `reads_negative_text`: the loop reads the negative prompt's text itself (SDXL: an empty one
    means zero embeddings with `force_zeros_for_empty_prompt`).
    """

    name: Family
    pipeline: str
    network: str
    network_subfolder: Literal["transformer", "unet"]
    scheduler: str
    latent_channels: int
    size_multiple: int
    guidance: Guidance
    encoders: tuple[EncoderUse, ...]
    denoiser_inputs: tuple[str, ...]
    denoiser: str
    vae: str
    vae_scale_factor: int = 8
    vae_shifted: bool = True
    controlnet: str | None = None
    controlnet_class: str | None = None
    controlnet_pipeline: str | None = None
    control_latents_shifted: bool | None = None
    packs_latents: bool = False
    reads_negative_text: bool = False
    default_side: int = 1024

    @property
    def is_unet(self) -> bool:
        return self.network_subfolder == "unet"

    @property
    def cfg(self) -> bool:
        """Whether `guidance_scale > 1` runs a second (negative) pass, as classifier-free guidance."""
        return self.guidance == "cfg"

    def check_size(self, height: int, width: int) -> None:
        """Raise ValueError unless both sides are multiples of `size_multiple`."""
        m = self.size_multiple
        if height % m or width % m:
            raise ValueError(f"{self.name}: height and width must be multiples of {m}, got {height}x{width}")


_SD3 = FamilyDescriptor(
    name="sd3",
    pipeline="StableDiffusion3Pipeline",
    network="SD3Transformer2DModel",
    network_subfolder="transformer",
    scheduler="FlowMatchEulerDiscreteScheduler",
    latent_channels=16,
    size_multiple=16,
    guidance="cfg",
    encoders=(EncoderUse("clip-l"), EncoderUse("clip-g"), EncoderUse("t5", max_sequence_length=256)),
    denoiser_inputs=("clip_l_embeds", "clip_l_pooled", "clip_g_embeds", "clip_g_pooled", "t5_embeds"),
    denoiser="sd3-transformer",
    vae="sd3-vae",
    controlnet="sd3-controlnet",
    controlnet_class="SD3ControlNetModel",
    controlnet_pipeline="StableDiffusion3ControlNetPipeline",
    control_latents_shifted=False,  # InstantX-style: zero pooled projections, unshifted latents
)

FAMILIES: dict[Family, FamilyDescriptor] = {
    d.name: d
    for d in (
        _SD3,
        # SD3.5-Large: SD3's architecture, pipeline, encoders and VAE, with weights of its own.
        replace(
            _SD3,
            name="sd35-large",
            denoiser="sd35-large-transformer",
            controlnet="sd35-large-controlnet",
            control_latents_shifted=True,  # Stability's: the pooled prompt, shifted latents
        ),
        FamilyDescriptor(
            name="flux",
            pipeline="FluxPipeline",
            network="FluxTransformer2DModel",
            network_subfolder="transformer",
            scheduler="FlowMatchEulerDiscreteScheduler",
            latent_channels=16,
            size_multiple=16,
            guidance="distilled",
            encoders=(
                EncoderUse("clip-l", outputs=("pooler",), negative=False),
                EncoderUse("t5", max_sequence_length=512, negative=False),
            ),
            denoiser_inputs=("clip_l_pooler", "t5_embeds"),
            denoiser="flux-transformer",
            vae="flux-vae",
            controlnet="flux-controlnet",
            controlnet_class="FluxControlNetModel",
            controlnet_pipeline="FluxControlNetPipeline",
            control_latents_shifted=True,
            packs_latents=True,
        ),
        FamilyDescriptor(
            name="sd15",
            pipeline="StableDiffusionPipeline",
            network="UNet2DConditionModel",
            network_subfolder="unet",
            scheduler="PNDMScheduler",  # when its scheduler config names none, as SD1.5's repository
            latent_channels=4,
            size_multiple=8,
            guidance="cfg",
            encoders=(EncoderUse("sd15-clip", outputs=("last",)),),
            denoiser_inputs=("clip_embeds",),
            denoiser="sd15-unet",
            vae="sd15-vae",
            vae_shifted=False,
            default_side=512,
        ),
        FamilyDescriptor(
            name="sdxl",
            pipeline="StableDiffusionXLPipeline",
            network="UNet2DConditionModel",
            network_subfolder="unet",
            scheduler="EulerDiscreteScheduler",
            latent_channels=4,
            size_multiple=8,
            guidance="cfg",
            encoders=(EncoderUse("clip-l", outputs=("embeds",)), EncoderUse("clip-g", outputs=("embeds", "pooled"))),
            denoiser_inputs=("clip_l_embeds", "clip_g_embeds", "clip_g_pooled"),
            denoiser="sdxl-unet",
            vae="sdxl-vae",
            vae_shifted=False,
            reads_negative_text=True,
        ),
    )
}


def family(name: str) -> FamilyDescriptor:
    """The descriptor of `name`; ValueError naming the known families otherwise."""
    try:
        return FAMILIES[name]  # type: ignore[index]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_of_denoiser(model_id: str) -> FamilyDescriptor:
    """The family whose base denoiser is `model_id` (each denoiser belongs to exactly one)."""
    for d in FAMILIES.values():
        if d.denoiser == model_id:
            return d
    raise ValueError(f"{model_id!r} is no family's denoiser; known: {', '.join(d.denoiser for d in FAMILIES.values())}")


def resolve_class(name: str, module: str = "diffusers") -> Any:
    """Import a class named in a descriptor (diffusers' by default), only when a loader needs it."""
    return getattr(importlib.import_module(module), name)
