"""RawTensor <-> torch.Tensor, bit-exact for every dtype the plane carries (bf16 included).

The only tensor-plane module that imports torch, so torch-free processes (the gateway) can use
the rest of the package. `device_bytes`/`from_device_bytes` are the device-side (CUDA) twins of
`to_raw`/`from_raw`: flat uint8 tensors that UCX sends and receives in device memory.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from shared.tensor_plane.raw import RawTensor

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES: dict[torch.dtype, str] = {v: k for k, v in _TORCH_DTYPES.items()}


def to_raw(t: torch.Tensor) -> RawTensor:
    """Raw bytes of `t` (detached, on CPU, contiguous); a view of its memory when already so.

    bf16 goes through an int16 view because numpy has no bfloat16; the bits are unchanged.
    """
    name = _NAMES.get(t.dtype)
    if name is None:
        raise ValueError(f"torch dtype {t.dtype} is not carried by the tensor plane ({sorted(_TORCH_DTYPES)})")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    flat = t.reshape(-1)
    if t.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    # .numpy() shares memory and keeps the tensor alive through the array's base.
    return RawTensor(flat.numpy().view(np.uint8), name, tuple(t.shape))


def from_raw(r: RawTensor) -> torch.Tensor:
    """A CPU tensor over the raw bytes: zero-copy when the buffer is writable, else a copy.

    Read-only buffers (bytes, read-only views) are copied so the tensor is always safe to modify.
    """
    dtype = _TORCH_DTYPES[r.dtype]
    if r.nbytes == 0:
        return torch.empty(r.shape, dtype=dtype)
    mv = r.buffer()
    if mv.readonly:
        mv = memoryview(bytearray(mv))
    return torch.frombuffer(mv, dtype=dtype).reshape(r.shape)


def dtype_name(t: torch.Tensor) -> str:
    """The plane's name of `t`'s dtype; ValueError for a dtype it does not carry."""
    name = _NAMES.get(t.dtype)
    if name is None:
        raise ValueError(f"torch dtype {t.dtype} is not carried by the tensor plane ({sorted(_TORCH_DTYPES)})")
    return name


def device_bytes(t: torch.Tensor) -> torch.Tensor:
    """A private, contiguous copy of `t`'s bytes as a flat uint8 tensor on `t`'s device.

    The copy is a snapshot (the caller may reuse `t`), made on the device, and finished before
    this returns (the current stream is synchronised), so UCX can send it from any thread.
    """
    dtype_name(t)
    flat = t.detach().reshape(-1).contiguous()
    flat = (flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat).view(torch.uint8).clone()
    if flat.is_cuda:
        torch.cuda.current_stream(flat.device).synchronize()
    return flat


def settle(tensors: Iterable[torch.Tensor]) -> None:
    """Wait for the GPU work that produces `tensors`. A model call on a GPU returns once its
    kernels are queued, not run: a step's compute time must include them (the autoscaler prices
    steps by it), and its outputs are synchronised anyway before they are served."""
    for device in {t.device for t in tensors if t.is_cuda}:
        torch.cuda.current_stream(device).synchronize()


def from_device_bytes(flat: torch.Tensor, dtype: str, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """The tensor of `dtype` and `shape` over a flat uint8 buffer (any device), without a copy."""
    return flat.view(_TORCH_DTYPES[dtype]).reshape(tuple(shape))


def resolve_device(device: str) -> str:
    """A concrete torch device name: "auto" is "cuda" when torch sees a GPU, else "cpu"."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
