"""diffusers' own pipelines over the very directories the services load: the correctness oracle.

Why here and not in the zoo: serving never builds a whole pipeline. The tests compare the
mesh's images with these pipelines' bit for bit, the monolithic baseline serves them, and
`bench/memory.py` weighs them; each is diffusers' documented pipeline class, composed from
the zoo's paths where a family's directory does not hold every component itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shared.zoo.dtypes import model_dtype
from shared.zoo.families import FamilyDescriptor, resolve_class
from shared.zoo.families import family as family_descriptor
from shared.zoo.loaders import load_scheduler, load_vae, network_class, read_force_zeros_for_empty_prompt
from shared.zoo.paths import controlnet_dir, family_dir, lora_path, shared_dir, vae_dir

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from shared.settings import Settings


def build_reference_pipeline(settings: Settings, family: str = "sd3", controlnet: bool = False) -> DiffusionPipeline:
    """diffusers' own pipeline over the same directories the services load: the oracle.

    sd3 / sd35-large: StableDiffusion3Pipeline, or StableDiffusion3ControlNetPipeline with
    the family's ControlNet; flux: FluxPipeline or FluxControlNetPipeline, whose
    `text_encoder` is a `CLIPTextModel` loaded from the shared CLIP-L weights (its projection
    unused) and `text_encoder_2` the shared T5, with the shared tokenizers; sd15:
    StableDiffusionPipeline over its directory, without safety checker (none is served);
    sdxl: StableDiffusionXLPipeline over its directory's unet/, vae/ and scheduler/ with the
    shared CLIP-L (as SDXL's `CLIPTextModel`) and CLIP-G, without watermarker (none is served).
    """
    desc = family_descriptor(family)
    if controlnet and desc.controlnet is None:
        raise ValueError(f"family {family!r} has no ControlNet")
    pipe = _BUILDERS[desc.pipeline](settings, desc, controlnet)
    pipe = pipe.to(settings.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd15_reference(settings: Settings, desc: FamilyDescriptor, controlnet: bool) -> DiffusionPipeline:
    return resolve_class(desc.pipeline).from_pretrained(
        family_dir(desc.name, settings),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        dtype=model_dtype(settings),
    )


def _sdxl_reference(settings: Settings, desc: FamilyDescriptor, controlnet: bool) -> DiffusionPipeline:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    dt = {"dtype": model_dtype(settings)}
    shared, fam = shared_dir(settings), family_dir(desc.name, settings)
    return resolve_class(desc.pipeline)(
        vae=AutoencoderKL.from_pretrained(vae_dir(desc.vae, settings), **dt),  # the pipeline upcasts it itself
        text_encoder=CLIPTextModel.from_pretrained(shared / "text_encoder", **dt),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(shared / "text_encoder_2", **dt),
        tokenizer=CLIPTokenizer.from_pretrained(shared / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(shared / "tokenizer_2"),
        unet=UNet2DConditionModel.from_pretrained(fam / "unet", **dt),
        scheduler=load_scheduler(desc.name, fam / "scheduler"),
        force_zeros_for_empty_prompt=read_force_zeros_for_empty_prompt(fam),
        add_watermarker=False,
    )


def _common_components(settings: Settings, desc: FamilyDescriptor, controlnet: bool) -> dict[str, Any]:
    """What the SD3 and Flux pipelines take alike: the family's transformer, scheduler and VAE,
    the shared CLIP-L tokenizer, and the family's ControlNet where asked for."""
    from transformers import CLIPTokenizer

    dt = {"dtype": model_dtype(settings)}
    fam = family_dir(desc.name, settings)
    common: dict[str, Any] = {
        "transformer": network_class(desc.name).from_pretrained(fam / desc.network_subfolder, **dt),
        "scheduler": load_scheduler(desc.name, fam / "scheduler"),
        "vae": load_vae(desc.vae, settings).vae,
        "tokenizer": CLIPTokenizer.from_pretrained(shared_dir(settings) / "tokenizer"),
    }
    if controlnet:  # straight from_pretrained: the pipeline itself adapts it (e.g. SD3.5's pos_embed)
        cn_class = resolve_class(desc.controlnet_class or "")
        common["controlnet"] = cn_class.from_pretrained(controlnet_dir(desc.controlnet or "", settings), **dt)
    return common


def _pipeline_class(desc: FamilyDescriptor, controlnet: bool) -> Any:
    return resolve_class((desc.controlnet_pipeline if controlnet else None) or desc.pipeline)


def _sd3_reference(settings: Settings, desc: FamilyDescriptor, controlnet: bool) -> DiffusionPipeline:
    fam, shared = family_dir(desc.name, settings), shared_dir(settings)
    if not controlnet and fam == shared:
        # The family's directory holds the shared encoders too (sd3's: a whole SD3 pipeline
        # directory), so diffusers loads it as is.
        return _pipeline_class(desc, controlnet).from_pretrained(fam, dtype=model_dtype(settings))
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    dt = {"dtype": model_dtype(settings)}
    return _pipeline_class(desc, controlnet)(
        text_encoder=CLIPTextModelWithProjection.from_pretrained(shared / "text_encoder", **dt),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(shared / "text_encoder_2", **dt),
        text_encoder_3=T5EncoderModel.from_pretrained(shared / "text_encoder_3", **dt),
        tokenizer_2=CLIPTokenizer.from_pretrained(shared / "tokenizer_2"),
        tokenizer_3=T5TokenizerFast.from_pretrained(shared / "tokenizer_3"),
        **_common_components(settings, desc, controlnet),
    )


def _flux_reference(settings: Settings, desc: FamilyDescriptor, controlnet: bool) -> DiffusionPipeline:
    from transformers import CLIPTextModel, T5EncoderModel, T5TokenizerFast

    dt = {"dtype": model_dtype(settings)}
    shared = shared_dir(settings)
    return _pipeline_class(desc, controlnet)(
        text_encoder=CLIPTextModel.from_pretrained(shared / "text_encoder", **dt),
        text_encoder_2=T5EncoderModel.from_pretrained(shared / "text_encoder_3", **dt),
        tokenizer_2=T5TokenizerFast.from_pretrained(shared / "tokenizer_3"),
        **_common_components(settings, desc, controlnet),
    )


# How each diffusers pipeline class (`FamilyDescriptor.pipeline`) is put together from the zoo:
# its constructor's components differ (three text encoders for SD3, two for Flux and SDXL, ...).
_BUILDERS: dict[str, Callable[[Settings, FamilyDescriptor, bool], DiffusionPipeline]] = {
    "StableDiffusionPipeline": _sd15_reference,
    "StableDiffusionXLPipeline": _sdxl_reference,
    "StableDiffusion3Pipeline": _sd3_reference,
    "FluxPipeline": _flux_reference,
}


def load_reference_loras(pipe: DiffusionPipeline, loras: list[tuple[str, float]], settings: Settings) -> None:
    """Apply LoRAs to a reference pipeline the documented diffusers way:
    `pipe.load_lora_weights(path, adapter_name=name)` once per name, then
    `pipe.set_adapters(names, adapter_weights=scales)`. An empty list disables LoRA."""
    if not loras:
        if getattr(pipe.transformer, "peft_config", None):
            pipe.disable_lora()
        return
    loaded = set(getattr(pipe.transformer, "peft_config", {}) or {})
    for name, _ in loras:
        if name not in loaded:
            pipe.load_lora_weights(lora_path(name, settings), adapter_name=name)
    pipe.enable_lora()
    pipe.set_adapters([n for n, _ in loras], adapter_weights=[float(s) for _, s in loras])
