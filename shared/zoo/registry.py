"""Which models exist, which family each belongs to, and which service hosts it: pure data.

Why a torch-free table: the gateway validates requests (LoRA names, ControlNet ids) and lists
models, and the launcher decides which processes to start, without importing torch. The
loaders in `loaders.py` read the same table, so a model id means one thing everywhere.

Sharing is decided here: the three transformer families use the same `clip-l` and `t5` ids
(SD3 and SD3.5-Large also the same `clip-g` and `sd3-vae`), so one loaded copy serves them all.
SD1.5 (`sd15`, a UNet) shares nothing: its text encoder is a `CLIPTextModel` read for its last
hidden state (SD3's `clip-l` is a `CLIPTextModelWithProjection` read for its penultimate one and
its projected pool), as wide as its UNet's cross-attention, and shipped in its own directory;
its VAE has 4 latent channels. It has no ControlNet and no LoRAs here, so no variants.
SDXL (`sdxl`, a UNet too) reads the shared `clip-l` and `clip-g`: its two text encoders are
the same CLIP ViT-L/14 and OpenCLIP bigG/14 as SD3's, read the same way (penultimate hidden
states, bigG's projected pool), so one loaded copy serves SD3, SD3.5 and SDXL. Its UNet and its
4-channel VAE are its own; like sd15 it has no ControlNet and no LoRAs here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shared.zoo.families import Family

Role = Literal["text_encoder", "denoiser", "vae", "controlnet"]
# What differs between families (classes, channels, sizes, encoders, each family's denoiser, VAE
# and ControlNet) is one table: `shared.zoo.families`.

# The service (process type) that hosts each role.
SERVICE_OF_ROLE: dict[Role, str] = {
    "text_encoder": "encoder",
    "denoiser": "denoiser",
    "vae": "vae",
    "controlnet": "adapters",
}


@dataclass(frozen=True)
class ModelInfo:
    """One loadable model id. `families` lists every family whose workflows use it."""

    model_id: str
    role: Role
    families: tuple[Family, ...]
    description: str

    @property
    def service(self) -> str:
        return SERVICE_OF_ROLE[self.role]


@dataclass(frozen=True)
class LoraInfo:
    """A LoRA adapter: applied by the denoiser hosting `base` on the requests that name it."""

    name: str
    base: str  # denoiser model id
    description: str


MODELS: dict[str, ModelInfo] = {
    m.model_id: m
    for m in (
        ModelInfo("clip-l", "text_encoder", ("sd3", "sd35-large", "flux", "sdxl"), "CLIP ViT-L/14 text encoder"),
        ModelInfo("clip-g", "text_encoder", ("sd3", "sd35-large", "sdxl"), "OpenCLIP ViT-bigG/14 text encoder"),
        ModelInfo("t5", "text_encoder", ("sd3", "sd35-large", "flux"), "T5 v1.1 XXL encoder"),
        ModelInfo("sd3-transformer", "denoiser", ("sd3",), "SD3 (Medium-style) MMDiT"),
        ModelInfo("sd35-large-transformer", "denoiser", ("sd35-large",), "SD3.5-Large-style MMDiT (qk RMS norm)"),
        ModelInfo("flux-transformer", "denoiser", ("flux",), "Flux.1 (dev-style, guidance-distilled) transformer"),
        ModelInfo("sd3-vae", "vae", ("sd3", "sd35-large"), "SD3/SD3.5 16-channel VAE"),
        ModelInfo("flux-vae", "vae", ("flux",), "Flux 16-channel VAE"),
        ModelInfo("sd15-clip", "text_encoder", ("sd15",), "SD1.5 CLIP ViT-L/14 text encoder (last hidden state)"),
        ModelInfo("sd15-unet", "denoiser", ("sd15",), "SD1.5 UNet2DConditionModel"),
        ModelInfo("sd15-vae", "vae", ("sd15",), "SD1.5 4-channel VAE"),
        ModelInfo("sdxl-unet", "denoiser", ("sdxl",), "SDXL UNet2DConditionModel (text_time added conditions)"),
        ModelInfo("sdxl-vae", "vae", ("sdxl",), "SDXL 4-channel VAE"),
        ModelInfo("sd3-controlnet", "controlnet", ("sd3",), "SD3ControlNetModel for the SD3 transformer"),
        ModelInfo("sd35-large-controlnet", "controlnet", ("sd35-large",), "SD3ControlNetModel for SD3.5-Large"),
        ModelInfo("flux-controlnet", "controlnet", ("flux",), "FluxControlNetModel for the Flux transformer"),
    )
}

MODEL_IDS: tuple[str, ...] = tuple(MODELS)

LORAS: dict[str, LoraInfo] = {
    lora.name: lora
    for lora in (
        LoraInfo("sd3-lora-a", "sd3-transformer", "style adapter A for SD3"),
        LoraInfo("sd3-lora-b", "sd3-transformer", "style adapter B for SD3"),
        LoraInfo("sd35-large-lora-a", "sd35-large-transformer", "style adapter A for SD3.5-Large"),
        LoraInfo("sd35-large-lora-b", "sd35-large-transformer", "style adapter B for SD3.5-Large"),
        LoraInfo("flux-lora-a", "flux-transformer", "style adapter A for Flux"),
        LoraInfo("flux-lora-b", "flux-transformer", "style adapter B for Flux"),
    )
}


def models_of_service(service: str) -> list[str]:
    """Every model id a service type hosts, in table order."""
    return [m.model_id for m in MODELS.values() if m.service == service]


def loras_for(base: str) -> list[str]:
    return [lora.name for lora in LORAS.values() if lora.base == base]


def family_of(model_id: str) -> Family:
    """The one family a denoiser or ControlNet id belongs to (shared models have several)."""
    families = MODELS[model_id].families
    if len(families) != 1:
        raise ValueError(f"{model_id} is shared by several families: {', '.join(families)}")
    return families[0]
