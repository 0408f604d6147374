"""`RawTensor`: a tensor as raw bytes + dtype name + shape, the only form that crosses processes.

Kept free of torch on purpose: the gateway handles tensors (e.g. decoded images) without
importing torch. Nothing here ever pickles; the dtype names are torch-style strings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# dtype name -> (numpy dtype name or None when numpy has no such type, item size in bytes)
_DTYPES: dict[str, tuple[str | None, int]] = {
    "float32": ("float32", 4),
    "float16": ("float16", 2),
    "bfloat16": (None, 2),
    "float64": ("float64", 8),
    "int64": ("int64", 8),
    "int32": ("int32", 4),
    "int16": ("int16", 2),
    "int8": ("int8", 1),
    "uint8": ("uint8", 1),
    "bool": ("bool", 1),
}

DTYPES: frozenset[str] = frozenset(_DTYPES)

Buffer = memoryview | bytes | bytearray | np.ndarray


def itemsize(dtype: str) -> int:
    """Bytes per element of a dtype name; ValueError for a name the plane does not carry."""
    try:
        return _DTYPES[dtype][1]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def byte_view(data: Any) -> memoryview:
    """A flat unsigned-byte view of a C-contiguous buffer, without copying."""
    mv = data if isinstance(data, memoryview) else memoryview(data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")  # raises TypeError for non-contiguous buffers, which we never accept
    return mv


@dataclass(frozen=True, eq=False)
class RawTensor:
    """Raw bytes of a C-contiguous tensor plus its dtype name and shape.

    `data` may be a view of memory owned by something else (a shared-memory mapping, a torch
    tensor): the view keeps that memory alive, so holding the RawTensor (or anything derived
    from `data`) is enough.
    """

    data: Buffer
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        shape = tuple(int(d) for d in self.shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"negative dimension in shape {shape}")
        object.__setattr__(self, "shape", shape)
        expected = math.prod(shape) * itemsize(self.dtype)
        got = byte_view(self.data).nbytes
        if got != expected:
            raise ValueError(f"{got} bytes of data for a {self.dtype} tensor of shape {shape} ({expected} bytes)")

    @property
    def nbytes(self) -> int:
        """Size of the raw data in bytes."""
        return math.prod(self.shape) * _DTYPES[self.dtype][1]

    def buffer(self) -> memoryview:
        """The data as a flat byte memoryview (no copy)."""
        return byte_view(self.data)

    def tobytes(self) -> bytes:
        """A copy of the data as bytes (for small tensors and tests)."""
        return self.buffer().tobytes()

    @classmethod
    def from_numpy(cls, arr: np.ndarray) -> RawTensor:
        """Wrap a numpy array; copies only when it is not C-contiguous or not native-endian."""
        arr = np.asarray(arr)
        name = arr.dtype.name
        if name not in _DTYPES or _DTYPES[name][0] is None:
            raise ValueError(f"numpy dtype {arr.dtype} is not one the tensor plane carries ({sorted(_DTYPES)})")
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        shape = arr.shape
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        return cls(arr.reshape(-1).view(np.uint8), name, shape)

    def to_numpy(self) -> np.ndarray:
        """A numpy view of the data (zero-copy; writable when the underlying buffer is).

        bfloat16 has no numpy dtype: use `torch_codec.from_raw`, or view the bytes as uint16.
        """
        np_name = _DTYPES[self.dtype][0]
        if np_name is None:
            raise ValueError(
                f"{self.dtype} has no numpy dtype; use shared.tensor_plane.torch_codec.from_raw "
                "or np.frombuffer(raw.buffer(), np.uint16) for the raw bits"
            )
        if self.nbytes == 0:
            return np.empty(self.shape, dtype=np_name)
        return np.frombuffer(self.buffer(), dtype=np_name).reshape(self.shape)
