"""What a loader hands a service: a loaded model with the pieces that go with it.

Plain dataclasses, torch-free to import: the services' model modules name them in type hints
without loading anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from shared.zoo.families import Family


@dataclass
class TextEncoderBundle:
    """A text encoder with the tokenizer that feeds it; `kind` picks the encode function."""

    model_id: str
    model: Any
    tokenizer: Any
    kind: Literal["clip", "t5"]


@dataclass
class DenoiserBundle:
    """A base denoising network with its scheduler (a template: callers copy it per request).

    `family` picks the denoising loop: "sd3" and "sd35-large" run StableDiffusion3Pipeline's,
    "flux" FluxPipeline's, "sd15" StableDiffusionPipeline's, "sdxl" StableDiffusionXLPipeline's.
    `transformer` is the network the loop calls, whatever its architecture: for sd15 and sdxl a
    `UNet2DConditionModel` (one field, so the runner, the batching engine and the LoRA cache
    need not tell them apart). `force_zeros_for_empty_prompt`: SDXL's pipeline option (its
    model_index.json), zero negative embeddings when no negative prompt is given.
    """

    model_id: str
    transformer: Any
    scheduler: Any
    family: Family = "sd3"
    force_zeros_for_empty_prompt: bool = False


@dataclass
class VaeBundle:
    """A VAE: its decoder turns final latents into pixels, its encoder control images into latents."""

    model_id: str
    vae: Any


@dataclass
class ControlNetBundle:
    """A ControlNet for the base transformer of `family`; the adapters service hosts it."""

    model_id: str
    family: Family
    controlnet: Any
