"""The dtype every model is loaded in, from `LEGO_DTYPE` and the device.

Why one function: the services, the reference pipelines and the benchmarks must load weights
in the same dtype, or the mesh would no longer produce the pipeline's image bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.settings import Settings

# The names LEGO_DTYPE accepts -> torch's name for the dtype.
DTYPE_NAMES = {
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
    if name not in DTYPE_NAMES:
        raise ValueError(f"LEGO_DTYPE={settings.dtype!r} is not a dtype; use auto, bfloat16, float16 or float32")
    return getattr(torch, DTYPE_NAMES[name])
