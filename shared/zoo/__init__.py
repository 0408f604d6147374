"""The model zoo: model ids, the tiny seeded models, and one loader per service kind.

Importing this package is cheap: torch, transformers and diffusers load lazily inside the
functions that need them, so light processes (gateway, autoscaler) can use `MODEL_IDS`.
"""

from shared.zoo.loading import (
    MODEL_IDS,
    ControlNetBundle,
    DenoiserBundle,
    TextEncoderBundle,
    VaeBundle,
    build_reference_pipeline,
    controlnet_dir,
    ensure_tiny_models,
    family_dir,
    load_controlnet,
    load_denoiser,
    load_model,
    load_reference_loras,
    load_text_encoder,
    load_vae,
    lora_path,
    models_root,
    prepare_zoo,
    shared_dir,
)

__all__ = [
    "MODEL_IDS",
    "ControlNetBundle",
    "DenoiserBundle",
    "TextEncoderBundle",
    "VaeBundle",
    "build_reference_pipeline",
    "controlnet_dir",
    "ensure_tiny_models",
    "family_dir",
    "load_controlnet",
    "load_denoiser",
    "load_model",
    "load_reference_loras",
    "load_text_encoder",
    "load_vae",
    "lora_path",
    "models_root",
    "prepare_zoo",
    "shared_dir",
]
