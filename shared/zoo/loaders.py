"""Load one model of the zoo by id: what each service kind calls at start.

Every loader reads the directories `shared.zoo.paths` names with diffusers' / transformers'
own `from_pretrained`, in the dtype `shared.zoo.dtypes` picks, and returns a bundle
(`shared.zoo.bundles`) in eval mode on `settings.device`. Which class to load is the family
descriptor's (`shared.zoo.families`), not a branch here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from shared.zoo.bundles import ControlNetBundle, DenoiserBundle, TextEncoderBundle, VaeBundle
from shared.zoo.dtypes import model_dtype
from shared.zoo.families import FAMILIES, Family, FamilyDescriptor, resolve_class
from shared.zoo.paths import (
    CONTROLNET_FAMILIES,
    VAE_FAMILIES,
    controlnet_dir,
    family_dir,
    require,
    shared_dir,
    unknown_model,
    vae_dir,
)
from shared.zoo.registry import MODEL_IDS

if TYPE_CHECKING:
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
# VAEs whose pipeline decodes in float32 when loaded in float16 with `force_upcast` (SDXL's
# `upcast_vae`); the SD3, Flux and SD1.5 pipelines decode in the VAE's own dtype.
_UPCAST_VAES = ("sdxl-vae",)


def _place(module: Any, settings: Settings) -> Any:
    """A loaded model on the service's device, in eval mode. (Its dtype was chosen at
    `from_pretrained`, which keeps a class's `_keep_in_fp32_modules` in float32: a cast after
    loading would not.)"""
    return module.to(settings.device).eval()


def load_text_encoder(model_id: str, settings: Settings) -> TextEncoderBundle:
    """Load `clip-l`, `clip-g`, `t5` or `sd15-clip` with its tokenizer, in eval mode on `settings.device`."""
    if model_id not in _TEXT_ENCODERS:
        raise unknown_model(model_id, tuple(_TEXT_ENCODERS))
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
        model = clip_cls.from_pretrained(require(root / sub, model_id), dtype=model_dtype(settings))
        tokenizer = CLIPTokenizer.from_pretrained(require(root / tok_sub, f"{model_id} tokenizer"))
    else:
        model = T5EncoderModel.from_pretrained(require(root / sub, model_id), dtype=model_dtype(settings))
        tokenizer = T5TokenizerFast.from_pretrained(require(root / tok_sub, f"{model_id} tokenizer"))
    model = _place(model, settings)
    return TextEncoderBundle(model_id=model_id, model=model, tokenizer=tokenizer, kind=kind)


def network_class(family: Family) -> Any:
    """The diffusers class of a family's denoising network (transformer or UNet)."""
    return resolve_class(FAMILIES[family].network)


def load_scheduler(family: Family, path: Path) -> Any:
    """The transformer families' FlowMatch scheduler; for the UNet families the class their
    scheduler config names (PNDM in SD1.5's repository, Euler in SDXL's), as the pipeline's
    `from_pretrained` picks it."""
    import diffusers

    desc = FAMILIES[family]
    if not desc.is_unet:
        return resolve_class(desc.scheduler).from_pretrained(path)
    name = json.loads((path / "scheduler_config.json").read_text()).get("_class_name", desc.scheduler)
    cls = getattr(diffusers, name, None)
    if not isinstance(cls, type) or not issubclass(cls, diffusers.SchedulerMixin):
        raise ValueError(f"{path}: unknown scheduler class {name!r}")
    return cls.from_pretrained(path)


def read_force_zeros_for_empty_prompt(root: Path) -> bool:
    """StableDiffusionXLPipeline's option as a directory's model_index.json sets it; True (the
    pipeline's default, SDXL-base's value) where the directory has none (the tiny one)."""
    index = root / "model_index.json"
    return bool(json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True)) if index.is_file() else True


def load_denoiser(model_id: str, settings: Settings) -> DenoiserBundle:
    """Load a base transformer (sd15, sdxl: UNet) and the scheduler saved beside it."""
    if model_id not in _DENOISERS:
        raise unknown_model(model_id, tuple(_DENOISERS))
    family = _DENOISERS[model_id]
    desc = FAMILIES[family]
    root = family_dir(family, settings)
    network = network_class(family).from_pretrained(
        require(root / desc.network_subfolder, model_id), dtype=model_dtype(settings)
    )
    network = _place(network, settings)
    scheduler = load_scheduler(family, require(root / "scheduler", f"{model_id} scheduler"))
    # Only a loop that reads the negative prompt's text (SDXL's) can zero an empty one's embeddings.
    zeros = desc.reads_negative_text and read_force_zeros_for_empty_prompt(root)
    return DenoiserBundle(
        model_id=model_id, transformer=network, scheduler=scheduler, family=family, force_zeros_for_empty_prompt=zeros
    )


def load_vae(model_id: str, settings: Settings) -> VaeBundle:
    """Load `sd3-vae`, `flux-vae`, `sd15-vae` or `sdxl-vae` (the config carries scaling_factor and shift_factor)."""
    if model_id not in VAE_FAMILIES:
        raise unknown_model(model_id, tuple(VAE_FAMILIES))
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir(model_id, settings), dtype=model_dtype(settings))
    if model_id in _UPCAST_VAES and vae.dtype == torch.float16 and vae.config.force_upcast:
        # As StableDiffusionXLPipeline's decode: the float16 weights widened (exactly) to float32,
        # once at load rather than per request (the pipeline's in-place upcast would race here).
        vae = vae.to(torch.float32)
    return VaeBundle(model_id=model_id, vae=_place(vae, settings))


def _sd3_pos_embed_from_transformer(family: Family, settings: Settings) -> Any:
    """SD3.5's official ControlNets have no pos_embed of their own (`use_pos_embed=False`):
    StableDiffusion3ControlNetPipeline copies the base transformer's into them. The adapters
    service does the same from the transformer's files, reading only `pos_embed.*` tensors."""
    from diffusers.models.embeddings import PatchEmbed
    from safetensors import safe_open

    tdir = require(family_dir(family, settings) / "transformer", FAMILIES[family].denoiser)
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


def _check_flux_controlnet(cn: Any, path: Path, desc: FamilyDescriptor, settings: Settings) -> None:
    if cn.union or cn.input_hint_block is not None:
        raise NotImplementedError(f"{path}: Flux ControlNet-Union and hint-block ControlNets are not supported")


def _fit_sd3_controlnet(cn: Any, path: Path, desc: FamilyDescriptor, settings: Settings) -> None:
    """Refuse a ControlNet that takes its inputs another way than the family's; give one
    without a pos_embed the base transformer's (as StableDiffusion3ControlNetPipeline does)."""
    zeros = bool(cn.config.force_zeros_for_pooled_projection)
    shifted = desc.control_latents_shifted
    if zeros == shifted:
        raise ValueError(
            f"{path}: force_zeros_for_pooled_projection={zeros}, but {desc.name} ControlNets must have "
            f"{not shifted} (the VAE service encodes {desc.name} control images "
            f"{'with' if shifted else 'without'} the shift factor)"
        )
    if cn.pos_embed is None:
        cn.pos_embed = _sd3_pos_embed_from_transformer(desc.name, settings).to(cn.dtype)


# What each ControlNet class needs checked or completed after `from_pretrained`, by class name
# (`FamilyDescriptor.controlnet_class`).
_CONTROLNET_FIXUPS: dict[str, Callable[[Any, Path, FamilyDescriptor, Settings], None]] = {
    "FluxControlNetModel": _check_flux_controlnet,
    "SD3ControlNetModel": _fit_sd3_controlnet,
}


def load_controlnet(model_id: str, settings: Settings) -> ControlNetBundle:
    """Load a family's ControlNet (its descriptor's `controlnet_class`), in eval mode.

    Raises ValueError for a ControlNet that does not take its inputs the family's way
    (`FamilyDescriptor.control_latents_shifted`), NotImplementedError for kinds the mesh does not
    run (Flux ControlNet-Union, XLabs-style Flux ControlNets with a pixel hint block).
    """
    if model_id not in CONTROLNET_FAMILIES:
        raise unknown_model(model_id, tuple(CONTROLNET_FAMILIES))
    family = CONTROLNET_FAMILIES[model_id]
    desc = FAMILIES[family]
    class_name = desc.controlnet_class or ""
    path = controlnet_dir(model_id, settings)
    cn = resolve_class(class_name).from_pretrained(path, dtype=model_dtype(settings))
    _CONTROLNET_FIXUPS[class_name](cn, path, desc, settings)
    return ControlNetBundle(model_id=model_id, family=family, controlnet=_place(cn, settings))


def load_model(model_id: str, settings: Settings) -> TextEncoderBundle | DenoiserBundle | VaeBundle | ControlNetBundle:
    """Any model by id: convenient for a generic service entry point."""
    if model_id in _TEXT_ENCODERS:
        return load_text_encoder(model_id, settings)
    if model_id in _DENOISERS:
        return load_denoiser(model_id, settings)
    if model_id in VAE_FAMILIES:
        return load_vae(model_id, settings)
    if model_id in CONTROLNET_FAMILIES:
        return load_controlnet(model_id, settings)
    raise unknown_model(model_id, MODEL_IDS)
