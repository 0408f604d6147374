"""Tiny LoRA adapters, two per base model, cached in `tiny-loras-v1/<name>/`.

Each is a rank-4 LoRA on the attention projections of its base transformer, made by peft
(`LoraConfig(init_lora_weights=False)`: both factors random) under a seed of its own, and
written with the family pipeline's `save_lora_weights`, so the directory holds
`pytorch_lora_weights.safetensors` exactly as diffusers' `load_lora_weights` reads it
(keys `transformer.<module>.lora_A.weight` / `lora_B.weight`, no alpha: scale 1).

`B_GAIN` scales the up-projections: the LoRA then changes the image visibly but leaves it
recognisably the base model's (and scale 0.5 differs from 1.0).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from shared.zoo.families import FAMILIES, resolve_class
from shared.zoo.registry import LORAS, family_of
from shared.zoo.tiny import SEEDS as SD3_SEEDS
from shared.zoo.tiny import build_once, build_sd3_transformer, seeded

DIR_NAME = "tiny-loras-v1"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
SEEDS = {
    "sd3-lora-a": 1101,
    "sd3-lora-b": 1102,
    "sd35-large-lora-a": 1103,
    "sd35-large-lora-b": 1104,
    "flux-lora-a": 1105,
    "flux-lora-b": 1106,
}
RANK = 4
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
B_GAIN = 4.0


def _base_transformer(base: str) -> Any:
    from shared.zoo import tiny_flux, tiny_sd35

    if base == "sd3-transformer":
        return build_sd3_transformer(SD3_SEEDS["sd3-transformer"])
    if base == "sd35-large-transformer":
        return tiny_sd35.build_transformer()
    if base == "flux-transformer":
        return tiny_flux.build_transformer()
    raise ValueError(f"no tiny base transformer {base!r}")


def build_lora_state_dict(name: str) -> dict[str, Any]:
    """The LoRA's tensors, keys without the `transformer.` prefix (as peft names them)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    if name not in SEEDS:
        raise ValueError(f"no tiny LoRA {name!r}; known: {', '.join(SEEDS)}")
    transformer = _base_transformer(LORAS[name].base)
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGET_MODULES, init_lora_weights=False)
    with seeded(SEEDS[name]):
        transformer.add_adapter(config, adapter_name=name)
    state = get_peft_model_state_dict(transformer, adapter_name=name)
    return {k: (v * B_GAIN if ".lora_B." in k else v).detach().clone().contiguous() for k, v in state.items()}


def save_lora(name: str, directory: Path) -> None:
    pipeline_cls = resolve_class(FAMILIES[family_of(LORAS[name].base)].pipeline)  # its family's LoRA format
    pipeline_cls.save_lora_weights(directory, transformer_lora_layers=build_lora_state_dict(name))


def ensure_dir(cache_dir: str | os.PathLike[str], name: str) -> Path:
    if name not in SEEDS:
        raise ValueError(f"no tiny LoRA {name!r}; known: {', '.join(SEEDS)}")
    final = Path(cache_dir).expanduser() / DIR_NAME / name
    return build_once(final, lambda tmp: save_lora(name, tmp), {"name": f"{DIR_NAME}/{name}", "seed": SEEDS[name]})
