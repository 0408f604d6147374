"""The model zoo: model ids, the tiny seeded SD3 models, and one loader per service kind.

Importing this package is cheap: torch, transformers and diffusers load lazily inside the
functions that need them, so light processes (gateway, autoscaler) can use `MODEL_IDS`.
"""

from shared.zoo.loading import (
    MODEL_IDS,
    DenoiserBundle,
    TextEncoderBundle,
    VaeBundle,
    build_reference_pipeline,
    ensure_tiny_models,
    load_denoiser,
    load_model,
    load_text_encoder,
    load_vae,
    models_root,
)

__all__ = [
    "MODEL_IDS",
    "DenoiserBundle",
    "TextEncoderBundle",
    "VaeBundle",
    "build_reference_pipeline",
    "ensure_tiny_models",
    "load_denoiser",
    "load_model",
    "load_text_encoder",
    "load_vae",
    "models_root",
]
