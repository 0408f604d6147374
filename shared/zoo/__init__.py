"""The model zoo: model ids, the tiny seeded models, and one loader per service kind.

Importing this package is cheap: torch, transformers and diffusers load lazily inside the
functions that need them, so light processes (gateway, autoscaler) can use `MODEL_IDS`.

Modules, one job each: `registry` (which models exist), `families` (what differs between
families), `paths` (where each model is read: the models_dir layout), `dtypes` (the dtype
weights load in), `bundles` (what a loader returns), `loaders` (load one model by id); `tiny*`
build the tiny seeded models, `full_size` the real architectures on the meta device.
This package re-exports the serving API: services import from `shared.zoo`.
"""

from shared.zoo.bundles import ControlNetBundle, DenoiserBundle, TextEncoderBundle, VaeBundle
from shared.zoo.loaders import load_controlnet, load_denoiser, load_model, load_text_encoder, load_vae
from shared.zoo.paths import (
    controlnet_dir,
    ensure_tiny_models,
    family_dir,
    lora_path,
    models_root,
    prepare_zoo,
    shared_dir,
    vae_dir,
)
from shared.zoo.registry import MODEL_IDS

__all__ = [
    "MODEL_IDS",
    "ControlNetBundle",
    "DenoiserBundle",
    "TextEncoderBundle",
    "VaeBundle",
    "controlnet_dir",
    "ensure_tiny_models",
    "family_dir",
    "load_controlnet",
    "load_denoiser",
    "load_model",
    "load_text_encoder",
    "load_vae",
    "lora_path",
    "models_root",
    "prepare_zoo",
    "shared_dir",
    "vae_dir",
]
