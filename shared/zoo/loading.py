"""Load one model of the zoo by id, from the tiny cache or a user's directory of real weights.

Why one path: services, tests and the benchmark all call `from_pretrained` on diffusers'
directory layout, so the tiny models and a user's real checkout go through identical code,
and the reference pipelines (the oracle) are built from the very same directories.

Where each model comes from:

* Tiny (no `models_dir`): built once with fixed seeds under `settings.model_cache_dir`:
  `tiny-sd3-v1/` (an SD3 pipeline directory: the shared text encoders and tokenizers, the SD3
  transformer, scheduler and VAE), `tiny-sd35-large-v1/` and `tiny-flux-v1/` (transformer,
  scheduler, and Flux's VAE), `tiny-sd15-v1/` (a whole SD1.5 pipeline directory),
  `tiny-sdxl-v1/` (SDXL's unet/, vae/ and scheduler/),
  `tiny-controlnets-v1/<id>/`, `tiny-loras-v1/<name>/`.
* Real weights (`settings.models_dir`) in this layout (as before, `models_dir` may also itself
  be an SD3 diffusers directory: it then serves as `sd3/`, and the other pieces are looked up
  inside it at the same relative paths)::

      <models_dir>/sd3/                  diffusers StableDiffusion3Pipeline directory
      <models_dir>/sd35-large/           diffusers SD3.5-Large directory (transformer/, scheduler/)
      <models_dir>/flux/                 diffusers FluxPipeline directory (transformer/, scheduler/, vae/)
      <models_dir>/sd15/                 diffusers StableDiffusionPipeline directory (text_encoder/,
                                         tokenizer/, unet/, vae/, scheduler/; no safety checker read)
      <models_dir>/sdxl/                 diffusers StableDiffusionXLPipeline directory (unet/, vae/,
                                         scheduler/, model_index.json; its text encoders not read)
      <models_dir>/controlnets/<id>/     a ControlNet (config.json + weights), e.g. controlnets/flux-controlnet
      <models_dir>/loras/<name>/         pytorch_lora_weights.safetensors (or loras/<name>.safetensors)

  A family directory needs only what that family does not share: the text encoders (`clip-l`,
  `clip-g`, `t5`, with their tokenizers) and `sd3-vae` are read from the sd3 directory, or from
  the sd35-large one when there is no sd3 directory. Flux's CLIP-L and T5 are these shared ones
  too (Flux uses the same CLIP ViT-L/14 and T5 v1.1 XXL): a Flux directory's own `text_encoder`
  and `text_encoder_2` are not read. SD1.5 shares nothing: `sd15-clip` is its own directory's
  `text_encoder/` (a `CLIPTextModel`). SDXL's two text encoders are the shared `clip-l` and
  `clip-g` (the same CLIP ViT-L/14 and OpenCLIP bigG/14 as SD3's), so an SDXL directory's own
  `text_encoder*` and `tokenizer*` are not read either. A missing piece raises FileNotFoundError
  naming the path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from shared.zoo import tiny_controlnets, tiny_flux, tiny_loras, tiny_sd15, tiny_sd35, tiny_sdxl
from shared.zoo.families import FAMILIES, Family, resolve_class
from shared.zoo.registry import LORAS, MODEL_IDS
from shared.zoo.tiny import ensure_tiny_dir

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from shared.settings import Settings

# model id -> (model subfolder, tokenizer subfolder, kind), inside the shared encoders directory
_TEXT_ENCODERS: dict[str, tuple[str, str, Literal["clip", "t5"]]] = {
    "clip-l": ("text_encoder", "tokenizer", "clip"),
    "clip-g": ("text_encoder_2", "tokenizer_2", "clip"),
    "t5": ("text_encoder_3", "tokenizer_3", "t5"),
    "sd15-clip": ("text_encoder", "tokenizer", "clip"),
}
# Text encoders read from their family's own directory as a `CLIPTextModel` (no projection),
# not from the shared one as a `CLIPTextModelWithProjection`.
_OWN_TEXT_ENCODERS: dict[str, Family] = {"sd15-clip": "sd15"}
_DENOISERS: dict[str, Family] = {d.denoiser: f for f, d in FAMILIES.items()}
_CONTROLNETS: dict[str, Family] = {d.controlnet: f for f, d in FAMILIES.items() if d.controlnet}
# the family directory holding vae/
_VAES: dict[str, Family] = {"sd3-vae": "sd3", "flux-vae": "flux", "sd15-vae": "sd15", "sdxl-vae": "sdxl"}
_TINY_FAMILY_DIRS = {
    "sd35-large": tiny_sd35.ensure_dir,
    "flux": tiny_flux.ensure_dir,
    "sd15": tiny_sd15.ensure_dir,
    "sdxl": tiny_sdxl.ensure_dir,
}
# VAEs whose pipeline decodes in float32 when loaded in float16 with `force_upcast` (SDXL's
# `upcast_vae`); the SD3, Flux and SD1.5 pipelines decode in the VAE's own dtype.
_UPCAST_VAES = ("sdxl-vae",)
_SHARED_SOURCES: tuple[Family, ...] = ("sd3", "sd35-large")  # where shared encoders / sd3-vae are read


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


def _unknown(model_id: str, expected: tuple[str, ...] | list[str]) -> ValueError:
    return ValueError(
        f"unknown model id {model_id!r}; known ids for this loader: {', '.join(expected)} "
        f"(all model ids: {', '.join(MODEL_IDS)})"
    )


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what}: expected {path}, which does not exist")
    return path


def _user_root(settings: Settings) -> Path | None:
    return Path(settings.models_dir).expanduser() if settings.models_dir else None


def _is_pipeline_dir(path: Path) -> bool:
    return (path / "model_index.json").is_file() or (path / "transformer").is_dir()


_DTYPES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "float32": "float32",
    "fp32": "float32",
}


def model_dtype(settings: Settings):
    """The torch dtype weights are loaded in: `settings.dtype`, where "auto" means bfloat16 on a
    GPU (how these models are served: half the memory of float32, tensor cores) and float32 on
    the CPU (where bf16 matmuls are slower, and the tiny models' oracle runs)."""
    import torch

    name = settings.dtype.lower()
    if name == "auto":
        return torch.bfloat16 if settings.device.startswith("cuda") else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"LEGO_DTYPE={settings.dtype!r} is not a dtype; use auto, bfloat16, float16 or float32")
    return getattr(torch, _DTYPES[name])


def _place(module: Any, settings: Settings) -> Any:
    """A loaded model on the service's device, in eval mode. (Its dtype was chosen at
    `from_pretrained`, which keeps a class's `_keep_in_fp32_modules` in float32: a cast after
    loading would not.)"""
    return module.to(settings.device).eval()


# ---------------------------------------------------------------------------------------------
# Directories


def ensure_tiny_models(settings: Settings) -> Path:
    """Build the tiny SD3 models (and shared encoders) into `settings.model_cache_dir` once."""
    return ensure_tiny_dir(settings.model_cache_dir)


def family_dir(family: Family, settings: Settings) -> Path:
    """The diffusers directory of a family's own models (transformer/, scheduler/, maybe vae/)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    root = _user_root(settings)
    if root is None:
        cache = settings.model_cache_dir
        return ensure_tiny_dir(cache) if family == "sd3" else _TINY_FAMILY_DIRS[family](cache)
    if family == "sd3" and _is_pipeline_dir(root):
        return root  # today's layout: models_dir is itself an SD3 directory
    path = root / family
    if not path.is_dir():
        raise FileNotFoundError(
            f"models_dir {root} has no {family} models: expected a diffusers directory {path}"
            + (" (or models_dir itself an SD3 diffusers directory)" if family == "sd3" else "")
        )
    return path


def shared_dir(settings: Settings) -> Path:
    """Where the shared text encoders, their tokenizers and `sd3-vae` are read."""
    root = _user_root(settings)
    if root is None:
        return ensure_tiny_dir(settings.model_cache_dir)
    candidates = [root] if _is_pipeline_dir(root) else [root / f for f in _SHARED_SOURCES]
    for path in candidates:
        if (path / "text_encoder").is_dir():
            return path
    raise FileNotFoundError(
        f"no shared text encoders in models_dir {root}: expected {candidates[0] / 'text_encoder'}"
        + (f" or {candidates[1] / 'text_encoder'}" if len(candidates) > 1 else "")
    )


def models_root(settings: Settings) -> Path:
    """The SD3 directory (shared encoders, SD3 transformer and VAE): tiny cache or `models_dir`."""
    root = _user_root(settings)
    if root is not None and not _is_pipeline_dir(root) and not _is_pipeline_dir(root / "sd3"):
        raise FileNotFoundError(
            f"models_dir {root} is not an SD3 diffusers directory and has no {root / 'sd3'} directory"
        )
    return family_dir("sd3", settings)


def controlnet_dir(model_id: str, settings: Settings) -> Path:
    if model_id not in _CONTROLNETS:
        raise _unknown(model_id, tuple(_CONTROLNETS))
    root = _user_root(settings)
    if root is None:
        return tiny_controlnets.ensure_dir(settings.model_cache_dir, model_id)
    return _need(root / "controlnets" / model_id, f"ControlNet {model_id}")


def lora_path(name: str, settings: Settings) -> Path:
    """What `load_lora_weights` / `LoraCache` read for a LoRA: its directory (or .safetensors file)."""
    if name not in LORAS:
        raise ValueError(f"unknown LoRA {name!r}; known LoRAs: {', '.join(LORAS)}")
    root = _user_root(settings)
    if root is None:
        return tiny_loras.ensure_dir(settings.model_cache_dir, name)
    directory, file = root / "loras" / name, root / "loras" / f"{name}.safetensors"
    if (directory / tiny_loras.WEIGHT_NAME).is_file():
        return directory
    if file.is_file():
        return file
    raise FileNotFoundError(f"LoRA {name}: expected {directory / tiny_loras.WEIGHT_NAME} or {file}")


def prepare_zoo(settings: Settings) -> dict[str, Path]:
    """Build every tiny model once (what `python -m shared.zoo` runs before services start).

    With `models_dir` set nothing is built; the directories found are returned and missing
    pieces are left out (they fail, naming the path, only when a service loads them).
    """
    found: dict[str, Path] = {}
    steps: list[tuple[str, Any]] = [("shared", lambda: shared_dir(settings))]
    steps += [(f, lambda f=f: family_dir(f, settings)) for f in FAMILIES]
    steps += [(c, lambda c=c: controlnet_dir(c, settings)) for c in _CONTROLNETS]
    steps += [(n, lambda n=n: lora_path(n, settings)) for n in LORAS]
    for key, step in steps:
        try:
            found[key] = step()
        except FileNotFoundError:
            if not settings.models_dir:
                raise
    return found


# ---------------------------------------------------------------------------------------------
# Loaders


def load_text_encoder(model_id: str, settings: Settings) -> TextEncoderBundle:
    """Load `clip-l`, `clip-g`, `t5` or `sd15-clip` with its tokenizer, in eval mode on `settings.device`."""
    if model_id not in _TEXT_ENCODERS:
        raise _unknown(model_id, tuple(_TEXT_ENCODERS))
    from transformers import (
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5EncoderModel,
        T5TokenizerFast,
    )

    own = _OWN_TEXT_ENCODERS.get(model_id)
    root = family_dir(own, settings) if own else shared_dir(settings)
    sub, tok_sub, kind = _TEXT_ENCODERS[model_id]
    if kind == "clip":
        clip_cls = CLIPTextModel if own else CLIPTextModelWithProjection
        model = clip_cls.from_pretrained(_need(root / sub, model_id), dtype=model_dtype(settings))
        tokenizer = CLIPTokenizer.from_pretrained(_need(root / tok_sub, f"{model_id} tokenizer"))
    else:
        model = T5EncoderModel.from_pretrained(_need(root / sub, model_id), dtype=model_dtype(settings))
        tokenizer = T5TokenizerFast.from_pretrained(_need(root / tok_sub, f"{model_id} tokenizer"))
    model = _place(model, settings)
    return TextEncoderBundle(model_id=model_id, model=model, tokenizer=tokenizer, kind=kind)


def _network_class(family: Family):
    return resolve_class(FAMILIES[family].network)


def _scheduler_of(family: Family, path: Path):
    """The transformer families' FlowMatch scheduler; for the UNet families the class their
    scheduler config names (PNDM in SD1.5's repository, Euler in SDXL's), as the pipeline's
    `from_pretrained` picks it."""
    import diffusers

    desc = FAMILIES[family]
    if not desc.is_unet:
        return resolve_class(desc.scheduler).from_pretrained(path)
    import json

    name = json.loads((path / "scheduler_config.json").read_text()).get("_class_name", desc.scheduler)
    cls = getattr(diffusers, name, None)
    if not isinstance(cls, type) or not issubclass(cls, diffusers.SchedulerMixin):
        raise ValueError(f"{path}: unknown scheduler class {name!r}")
    return cls.from_pretrained(path)


def load_denoiser(model_id: str, settings: Settings) -> DenoiserBundle:
    """Load a base transformer (sd15, sdxl: UNet) and the scheduler saved beside it."""
    if model_id not in _DENOISERS:
        raise _unknown(model_id, tuple(_DENOISERS))
    family = _DENOISERS[model_id]
    root = family_dir(family, settings)
    sub = FAMILIES[family].network_subfolder
    network = _network_class(family).from_pretrained(_need(root / sub, model_id), dtype=model_dtype(settings))
    network = _place(network, settings)
    scheduler = _scheduler_of(family, _need(root / "scheduler", f"{model_id} scheduler"))
    zeros = family == "sdxl" and _force_zeros_for_empty_prompt(root)
    return DenoiserBundle(
        model_id=model_id, transformer=network, scheduler=scheduler, family=family, force_zeros_for_empty_prompt=zeros
    )


def _force_zeros_for_empty_prompt(root: Path) -> bool:
    """StableDiffusionXLPipeline's option as a directory's model_index.json sets it; True (the
    pipeline's default, SDXL-base's value) where the directory has none (the tiny one)."""
    import json

    index = root / "model_index.json"
    return bool(json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True)) if index.is_file() else True


def vae_dir(model_id: str, settings: Settings) -> Path:
    if model_id not in _VAES:
        raise _unknown(model_id, tuple(_VAES))
    root = shared_dir(settings) if model_id == "sd3-vae" else family_dir(_VAES[model_id], settings)
    return _need(root / "vae", model_id)


def load_vae(model_id: str, settings: Settings) -> VaeBundle:
    """Load `sd3-vae`, `flux-vae`, `sd15-vae` or `sdxl-vae` (the config carries scaling_factor and shift_factor)."""
    if model_id not in _VAES:
        raise _unknown(model_id, tuple(_VAES))
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir(model_id, settings), dtype=model_dtype(settings))
    if model_id in _UPCAST_VAES and vae.dtype == torch.float16 and vae.config.force_upcast:
        # As StableDiffusionXLPipeline's decode: the float16 weights widened (exactly) to float32,
        # once at load rather than per request (the pipeline's in-place upcast would race here).
        vae = vae.to(torch.float32)
    return VaeBundle(model_id=model_id, vae=_place(vae, settings))


def _sd3_pos_embed_from_transformer(family: Family, settings: Settings):
    """SD3.5's official ControlNets have no pos_embed of their own (`use_pos_embed=False`):
    StableDiffusion3ControlNetPipeline copies the base transformer's into them. The adapters
    service does the same from the transformer's files, reading only `pos_embed.*` tensors."""
    import json

    from diffusers.models.embeddings import PatchEmbed
    from safetensors import safe_open

    tdir = _need(family_dir(family, settings) / "transformer", FAMILIES[family].denoiser)
    cfg = json.loads((tdir / "config.json").read_text())
    state: dict[str, Any] = {}
    for file in sorted(tdir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            state |= {k.removeprefix("pos_embed."): f.get_tensor(k) for k in f.keys() if k.startswith("pos_embed.")}
    pos_embed = PatchEmbed(
        height=cfg["sample_size"],
        width=cfg["sample_size"],
        patch_size=cfg["patch_size"],
        in_channels=cfg["in_channels"],
        embed_dim=cfg["num_attention_heads"] * cfg["attention_head_dim"],
        pos_embed_max_size=cfg["pos_embed_max_size"],
    )
    pos_embed.load_state_dict(state, strict=True)
    return pos_embed


def load_controlnet(model_id: str, settings: Settings) -> ControlNetBundle:
    """Load a family's ControlNet (SD3ControlNetModel or FluxControlNetModel), in eval mode.

    Raises ValueError for a ControlNet that does not take its inputs the family's way
    (`FamilyDescriptor.control_latents_shifted`), NotImplementedError for kinds the mesh does not
    run (Flux ControlNet-Union, XLabs-style Flux ControlNets with a pixel hint block).
    """
    if model_id not in _CONTROLNETS:
        raise _unknown(model_id, tuple(_CONTROLNETS))
    from diffusers import FluxControlNetModel, SD3ControlNetModel

    family = _CONTROLNETS[model_id]
    path = controlnet_dir(model_id, settings)
    if family == "flux":
        cn = FluxControlNetModel.from_pretrained(path, dtype=model_dtype(settings))
        if cn.union or cn.input_hint_block is not None:
            raise NotImplementedError(f"{path}: Flux ControlNet-Union and hint-block ControlNets are not supported")
    else:
        cn = SD3ControlNetModel.from_pretrained(path, dtype=model_dtype(settings))
        zeros = bool(cn.config.force_zeros_for_pooled_projection)
        shifted = FAMILIES[family].control_latents_shifted
        if zeros == shifted:
            raise ValueError(
                f"{path}: force_zeros_for_pooled_projection={zeros}, but {family} ControlNets must have "
                f"{not shifted} (the VAE service encodes {family} control images "
                f"{'with' if shifted else 'without'} the shift factor)"
            )
        if cn.pos_embed is None:
            cn.pos_embed = _sd3_pos_embed_from_transformer(family, settings).to(cn.dtype)
    cn = _place(cn, settings)
    return ControlNetBundle(model_id=model_id, family=family, controlnet=cn)


def load_model(model_id: str, settings: Settings) -> TextEncoderBundle | DenoiserBundle | VaeBundle | ControlNetBundle:
    """Any model by id: convenient for a generic service entry point."""
    if model_id in _TEXT_ENCODERS:
        return load_text_encoder(model_id, settings)
    if model_id in _DENOISERS:
        return load_denoiser(model_id, settings)
    if model_id in _VAES:
        return load_vae(model_id, settings)
    if model_id in _CONTROLNETS:
        return load_controlnet(model_id, settings)
    raise _unknown(model_id, MODEL_IDS)


# ---------------------------------------------------------------------------------------------
# Reference pipelines: the correctness oracle


def build_reference_pipeline(settings: Settings, family: Family = "sd3", controlnet: bool = False) -> DiffusionPipeline:
    """diffusers' own pipeline over the same directories the services load: the oracle.

    sd3 / sd35-large: StableDiffusion3Pipeline, or StableDiffusion3ControlNetPipeline with
    the family's ControlNet; flux: FluxPipeline or FluxControlNetPipeline, whose
    `text_encoder` is a `CLIPTextModel` loaded from the shared CLIP-L weights (its projection
    unused) and `text_encoder_2` the shared T5, with the shared tokenizers; sd15:
    StableDiffusionPipeline over its directory, without safety checker (none is served);
    sdxl: StableDiffusionXLPipeline over its directory's unet/, vae/ and scheduler/ with the
    shared CLIP-L (as SDXL's `CLIPTextModel`) and CLIP-G, without watermarker (none is served).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    if controlnet and FAMILIES[family].controlnet is None:
        raise ValueError(f"family {family!r} has no ControlNet")
    if family == "sd15":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            family_dir(family, settings),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            dtype=model_dtype(settings),
        )
    elif family == "sdxl":
        pipe = _sdxl_reference(settings)
    elif family == "sd3" and not controlnet:
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(models_root(settings), dtype=model_dtype(settings))
    else:
        pipe = _compose_reference(settings, family, controlnet)
    pipe = pipe.to(settings.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sdxl_reference(settings: Settings) -> DiffusionPipeline:
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    dt = {"dtype": model_dtype(settings)}
    shared, fam = shared_dir(settings), family_dir("sdxl", settings)
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(vae_dir("sdxl-vae", settings), **dt),  # the pipeline upcasts it itself
        text_encoder=CLIPTextModel.from_pretrained(shared / "text_encoder", **dt),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(shared / "text_encoder_2", **dt),
        tokenizer=CLIPTokenizer.from_pretrained(shared / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(shared / "tokenizer_2"),
        unet=UNet2DConditionModel.from_pretrained(fam / "unet", **dt),
        scheduler=_scheduler_of("sdxl", fam / "scheduler"),
        force_zeros_for_empty_prompt=_force_zeros_for_empty_prompt(fam),
        add_watermarker=False,
    )


def _compose_reference(settings: Settings, family: Family, controlnet: bool) -> DiffusionPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    dt = {"dtype": model_dtype(settings)}
    shared = shared_dir(settings)
    fam = family_dir(family, settings)
    desc = FAMILIES[family]
    common: dict[str, Any] = {
        "transformer": _network_class(family).from_pretrained(fam / "transformer", **dt),
        "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(fam / "scheduler"),
        "vae": load_vae(desc.vae, settings).vae,
        "tokenizer": CLIPTokenizer.from_pretrained(shared / "tokenizer"),
    }
    if controlnet:  # straight from_pretrained: the pipeline itself adapts it (e.g. SD3.5's pos_embed)
        from diffusers import FluxControlNetModel, SD3ControlNetModel

        cn_cls = FluxControlNetModel if family == "flux" else SD3ControlNetModel
        common["controlnet"] = cn_cls.from_pretrained(controlnet_dir(desc.controlnet, settings), **dt)
    if family == "flux":
        from diffusers import FluxControlNetPipeline, FluxPipeline

        flux_cls = FluxControlNetPipeline if controlnet else FluxPipeline
        return flux_cls(
            text_encoder=CLIPTextModel.from_pretrained(shared / "text_encoder", **dt),
            text_encoder_2=T5EncoderModel.from_pretrained(shared / "text_encoder_3", **dt),
            tokenizer_2=T5TokenizerFast.from_pretrained(shared / "tokenizer_3"),
            **common,
        )
    from diffusers import StableDiffusion3ControlNetPipeline, StableDiffusion3Pipeline

    sd3_cls = StableDiffusion3ControlNetPipeline if controlnet else StableDiffusion3Pipeline
    return sd3_cls(
        text_encoder=CLIPTextModelWithProjection.from_pretrained(shared / "text_encoder", **dt),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(shared / "text_encoder_2", **dt),
        text_encoder_3=T5EncoderModel.from_pretrained(shared / "text_encoder_3", **dt),
        tokenizer_2=CLIPTokenizer.from_pretrained(shared / "tokenizer_2"),
        tokenizer_3=T5TokenizerFast.from_pretrained(shared / "tokenizer_3"),
        **common,
    )


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
