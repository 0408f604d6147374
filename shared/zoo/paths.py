"""Where each model of the zoo is read: the tiny cache, or a user's directory of real weights.

Why one place: services, tests and the benchmark all call `from_pretrained` on diffusers'
directory layout, so the tiny models and a user's real checkout go through identical code,
and the reference pipelines (the oracle) are built from the very same directories. The
loaders (`shared.zoo.loaders`) ask this module for every path.

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

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.zoo import tiny_controlnets, tiny_flux, tiny_loras, tiny_sd15, tiny_sd35, tiny_sdxl
from shared.zoo.families import FAMILIES, Family
from shared.zoo.registry import LORAS, MODEL_IDS
from shared.zoo.tiny import ensure_tiny_dir

if TYPE_CHECKING:
    from shared.settings import Settings


def _families_by_vae() -> dict[str, tuple[Family, ...]]:
    found: dict[str, tuple[Family, ...]] = {}
    for name, desc in FAMILIES.items():
        found[desc.vae] = (*found.get(desc.vae, ()), name)
    return found


# ControlNet id -> its family; VAE id -> the families that decode with it (in table order).
CONTROLNET_FAMILIES: dict[str, Family] = {d.controlnet: f for f, d in FAMILIES.items() if d.controlnet}
VAE_FAMILIES: dict[str, tuple[Family, ...]] = _families_by_vae()
# Where each family's tiny directory is built (sd3's is the whole tiny SD3 pipeline, shared encoders included).
_TINY_FAMILY_DIRS: dict[Family, Callable[[str], Path]] = {
    "sd3": ensure_tiny_dir,
    "sd35-large": tiny_sd35.ensure_dir,
    "flux": tiny_flux.ensure_dir,
    "sd15": tiny_sd15.ensure_dir,
    "sdxl": tiny_sdxl.ensure_dir,
}
# The layout before families had directories: models_dir itself an SD3 directory, read as sd3/.
_ROOT_FAMILY: Family = "sd3"
_SHARED_SOURCES: tuple[Family, ...] = ("sd3", "sd35-large")  # where shared encoders / sd3-vae are read


def unknown_model(model_id: str, expected: tuple[str, ...] | list[str]) -> ValueError:
    """The error for an id a loader does not know: the ids it does, and every id of the zoo."""
    return ValueError(
        f"unknown model id {model_id!r}; known ids for this loader: {', '.join(expected)} "
        f"(all model ids: {', '.join(MODEL_IDS)})"
    )


def require(path: Path, what: str) -> Path:
    """`path`, or FileNotFoundError naming it: a missing piece of a user's layout says where it was expected."""
    if not path.exists():
        raise FileNotFoundError(f"{what}: expected {path}, which does not exist")
    return path


def _user_root(settings: Settings) -> Path | None:
    return Path(settings.models_dir).expanduser() if settings.models_dir else None


def _is_pipeline_dir(path: Path) -> bool:
    return (path / "model_index.json").is_file() or (path / "transformer").is_dir()


def ensure_tiny_models(settings: Settings) -> Path:
    """Build the tiny SD3 models (and shared encoders) into `settings.model_cache_dir` once."""
    return ensure_tiny_dir(settings.model_cache_dir)


def family_dir(family: Family, settings: Settings) -> Path:
    """The diffusers directory of a family's own models (transformer/, scheduler/, maybe vae/)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    root = _user_root(settings)
    if root is None:
        return _TINY_FAMILY_DIRS[family](settings.model_cache_dir)
    if family == _ROOT_FAMILY and _is_pipeline_dir(root):
        return root  # the older layout: models_dir is itself an SD3 directory
    path = root / family
    if not path.is_dir():
        raise FileNotFoundError(
            f"models_dir {root} has no {family} models: expected a diffusers directory {path}"
            + (" (or models_dir itself an SD3 diffusers directory)" if family == _ROOT_FAMILY else "")
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
    if root is not None and not _is_pipeline_dir(root) and not _is_pipeline_dir(root / _ROOT_FAMILY):
        raise FileNotFoundError(
            f"models_dir {root} is not an SD3 diffusers directory and has no {root / _ROOT_FAMILY} directory"
        )
    return family_dir(_ROOT_FAMILY, settings)


def controlnet_dir(model_id: str, settings: Settings) -> Path:
    """A ControlNet's directory (config.json + weights)."""
    if model_id not in CONTROLNET_FAMILIES:
        raise unknown_model(model_id, tuple(CONTROLNET_FAMILIES))
    root = _user_root(settings)
    if root is None:
        return tiny_controlnets.ensure_dir(settings.model_cache_dir, model_id)
    return require(root / "controlnets" / model_id, f"ControlNet {model_id}")


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


def vae_dir(model_id: str, settings: Settings) -> Path:
    """A VAE's directory: its family's `vae/`, or the shared one for a VAE several families decode with."""
    if model_id not in VAE_FAMILIES:
        raise unknown_model(model_id, tuple(VAE_FAMILIES))
    families = VAE_FAMILIES[model_id]
    # sd3-vae (SD3 and SD3.5-Large) is read where the text encoders they share are.
    root = shared_dir(settings) if len(families) > 1 else family_dir(families[0], settings)
    return require(root / "vae", model_id)


def prepare_zoo(settings: Settings) -> dict[str, Path]:
    """Build every tiny model once (what `python -m shared.zoo` runs before services start).

    With `models_dir` set nothing is built; the directories found are returned and missing
    pieces are left out (they fail, naming the path, only when a service loads them).
    """
    found: dict[str, Path] = {}
    steps: list[tuple[str, Any]] = [("shared", lambda: shared_dir(settings))]
    steps += [(f, lambda f=f: family_dir(f, settings)) for f in FAMILIES]
    steps += [(c, lambda c=c: controlnet_dir(c, settings)) for c in CONTROLNET_FAMILIES]
    steps += [(n, lambda n=n: lora_path(n, settings)) for n in LORAS]
    for key, step in steps:
        try:
            found[key] = step()
        except FileNotFoundError:
            if not settings.models_dir:
                raise
    return found
