"""Load one model of the zoo by id, from the tiny cache or a real SD3 diffusers directory.

Why one path: services, tests and the benchmark all call `from_pretrained` on the same
directory layout (text_encoder, text_encoder_2, text_encoder_3, tokenizer, tokenizer_2,
tokenizer_3, transformer, vae, scheduler), so the tiny models and a user's real SD3
checkout go through identical code, and the reference pipeline sees the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from shared.zoo.tiny import ensure_tiny_dir

if TYPE_CHECKING:
    from diffusers import StableDiffusion3Pipeline

    from shared.settings import Settings

MODEL_IDS: tuple[str, ...] = ("clip-l", "clip-g", "t5", "sd3-transformer", "sd3-vae")

# model id -> (model subfolder, tokenizer subfolder, kind)
_TEXT_ENCODERS: dict[str, tuple[str, str, Literal["clip", "t5"]]] = {
    "clip-l": ("text_encoder", "tokenizer", "clip"),
    "clip-g": ("text_encoder_2", "tokenizer_2", "clip"),
    "t5": ("text_encoder_3", "tokenizer_3", "t5"),
}
_DENOISERS = ("sd3-transformer",)
_VAES = ("sd3-vae",)


@dataclass
class TextEncoderBundle:
    """A text encoder with the tokenizer that feeds it; `kind` picks the encode function."""

    model_id: str
    model: Any
    tokenizer: Any
    kind: Literal["clip", "t5"]


@dataclass
class DenoiserBundle:
    """The SD3 transformer with its scheduler (a template: callers copy it per request)."""

    model_id: str
    transformer: Any
    scheduler: Any


@dataclass
class VaeBundle:
    """The VAE whose decoder turns final latents into pixels."""

    model_id: str
    vae: Any


def _unknown(model_id: str, expected: tuple[str, ...]) -> ValueError:
    return ValueError(
        f"unknown model id {model_id!r}; known ids for this loader: {', '.join(expected)} "
        f"(all model ids: {', '.join(MODEL_IDS)})"
    )


def ensure_tiny_models(settings: Settings) -> Path:
    """Build the tiny seeded models into `settings.model_cache_dir` once, then reuse them."""
    return ensure_tiny_dir(settings.model_cache_dir)


def models_root(settings: Settings) -> Path:
    """The directory every loader reads: `settings.models_dir` if set, else the tiny cache."""
    if settings.models_dir:
        root = Path(settings.models_dir).expanduser()
        if not (root / "model_index.json").is_file() and not (root / "transformer").is_dir():
            raise FileNotFoundError(f"models_dir {root} is not an SD3 diffusers directory")
        return root
    return ensure_tiny_models(settings)


def load_text_encoder(model_id: str, settings: Settings) -> TextEncoderBundle:
    """Load `clip-l`, `clip-g` or `t5` with its tokenizer, in eval mode on `settings.device`."""
    if model_id not in _TEXT_ENCODERS:
        raise _unknown(model_id, tuple(_TEXT_ENCODERS))
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    root = models_root(settings)
    sub, tok_sub, kind = _TEXT_ENCODERS[model_id]
    if kind == "clip":
        model = CLIPTextModelWithProjection.from_pretrained(root / sub)
        tokenizer = CLIPTokenizer.from_pretrained(root / tok_sub)
    else:
        model = T5EncoderModel.from_pretrained(root / sub)
        tokenizer = T5TokenizerFast.from_pretrained(root / tok_sub)
    model = model.to(settings.device).eval()
    return TextEncoderBundle(model_id=model_id, model=model, tokenizer=tokenizer, kind=kind)


def load_denoiser(model_id: str, settings: Settings) -> DenoiserBundle:
    """Load the SD3 transformer and the FlowMatch scheduler saved beside it."""
    if model_id not in _DENOISERS:
        raise _unknown(model_id, _DENOISERS)
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    root = models_root(settings)
    transformer = SD3Transformer2DModel.from_pretrained(root / "transformer").to(settings.device).eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler")
    return DenoiserBundle(model_id=model_id, transformer=transformer, scheduler=scheduler)


def load_vae(model_id: str, settings: Settings) -> VaeBundle:
    """Load the SD3 VAE (its config carries scaling_factor and shift_factor)."""
    if model_id not in _VAES:
        raise _unknown(model_id, _VAES)
    from diffusers import AutoencoderKL

    root = models_root(settings)
    vae = AutoencoderKL.from_pretrained(root / "vae").to(settings.device).eval()
    return VaeBundle(model_id=model_id, vae=vae)


def load_model(model_id: str, settings: Settings) -> TextEncoderBundle | DenoiserBundle | VaeBundle:
    """Any model by id: convenient for a generic service entry point."""
    if model_id in _TEXT_ENCODERS:
        return load_text_encoder(model_id, settings)
    if model_id in _DENOISERS:
        return load_denoiser(model_id, settings)
    if model_id in _VAES:
        return load_vae(model_id, settings)
    raise _unknown(model_id, MODEL_IDS)


def build_reference_pipeline(settings: Settings) -> StableDiffusion3Pipeline:
    """diffusers' own StableDiffusion3Pipeline from the same directory: the correctness oracle."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(models_root(settings))
    pipe = pipe.to(settings.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
