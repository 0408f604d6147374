"""Tensor plane: tensors stay with their producer; messages carry `TensorRef`s; consumers pull.

Public API (torch-free): `TensorPlane`, `RawTensor`, `TensorUnavailable`, `DTYPES`.
`to_raw`/`from_raw` (torch <-> RawTensor) live in `shared.tensor_plane.torch_codec` and are
re-exported lazily here so importing this package never imports torch.
"""

from __future__ import annotations

from typing import Any

from shared.tensor_plane.errors import TensorUnavailable
from shared.tensor_plane.plane import TensorPlane
from shared.tensor_plane.raw import DTYPES, RawTensor
from shared.tensor_plane.shm import host_identity

__all__ = ["DTYPES", "RawTensor", "TensorPlane", "TensorUnavailable", "from_raw", "host_identity", "to_raw"]


def __getattr__(name: str) -> Any:
    if name in ("to_raw", "from_raw"):
        from shared.tensor_plane import torch_codec

        return getattr(torch_codec, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
