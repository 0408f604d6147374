"""Commands and results between the leader of a group and its followers.

Why no pickle: a group's ranks are processes of one replica, yet the rule of the house holds on
every channel: tensors travel as raw bytes with dtype and shape. A message is a JSON header (its
structure, with each tensor replaced by {"t": i, "dtype", "shape"}) and the tensors' raw bytes
packed into one buffer, sent after their two sizes.
"""

from __future__ import annotations

import json
import math
import socket
import struct
import threading
from typing import Any

import torch

_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}
_DTYPES |= {str(d).removeprefix("torch."): d for d in (torch.int64, torch.int32, torch.uint8, torch.bool)}


def flatten(value: Any, tensors: list[torch.Tensor]) -> Any:
    """`value` as JSON-able structure, its tensors appended to `tensors` (and referred to by index)."""
    if isinstance(value, torch.Tensor):
        name = str(value.dtype).removeprefix("torch.")
        if name not in _DTYPES:
            raise TypeError(f"cannot send a tensor of dtype {value.dtype} inside a group")
        tensors.append(value.contiguous())
        return {"t": len(tensors) - 1, "dtype": name, "shape": list(value.shape)}
    if isinstance(value, dict):
        return {"d": {str(k): flatten(v, tensors) for k, v in value.items()}}
    if isinstance(value, list | tuple):
        return {"l": [flatten(v, tensors) for v in value]}
    if value is None or isinstance(value, bool | int | float | str):
        return {"v": value}
    raise TypeError(f"cannot send a {type(value).__name__} inside a group")


def rebuild(spec: Any, tensors: list[torch.Tensor]) -> Any:
    """The structure `flatten` described, with its tensors back in place."""
    if "t" in spec:
        return tensors[spec["t"]]
    if "d" in spec:
        return {k: rebuild(v, tensors) for k, v in spec["d"].items()}
    if "l" in spec:
        return [rebuild(v, tensors) for v in spec["l"]]
    return spec["v"]


def tensor_specs(spec: Any) -> list[tuple[int, str, list[int]]]:
    """(index, dtype, shape) of every tensor a structure refers to, in index order."""
    found: list[tuple[int, str, list[int]]] = []

    def walk(s: Any) -> None:
        if "t" in s:
            found.append((s["t"], s["dtype"], s["shape"]))
        for child in s.get("d", {}).values():
            walk(child)
        for child in s.get("l", []):
            walk(child)

    walk(spec)
    return sorted(found)


_ALIGN = 64  # every tensor starts at a multiple of this in a message's data, so its bytes view as its dtype


def _pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' bytes, one after another (each padded to `_ALIGN`), as one uint8 tensor."""
    pieces = []
    for t in tensors:
        flat = t.reshape(-1)
        if flat.stride(0) != 1:
            flat = flat.clone(memory_format=torch.contiguous_format)  # an expanded (stride 0) tensor
        raw = flat.view(torch.uint8)
        pieces.append(raw)
        if raw.numel() % _ALIGN:
            pieces.append(torch.zeros(_ALIGN - raw.numel() % _ALIGN, dtype=torch.uint8))
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.uint8)


def _unpack(data: torch.Tensor, spec: Any) -> list[torch.Tensor]:
    tensors, at = [], 0
    for _, dtype, shape in tensor_specs(spec):
        kind = _DTYPES[dtype]
        size = math.prod(shape) * torch.empty(0, dtype=kind).element_size()
        tensors.append(data[at : at + size].view(kind).reshape(shape))
        at += -(-size // _ALIGN) * _ALIGN
    return tensors


class Channel:
    """One end of a leader-follower connection: a stream socket (one end of a `socketpair`
    the leader makes for each follower it starts, so nothing listens on a port).

    Why a socket and not `torch.distributed`'s send/recv: a step's command is a few small
    tensors, and each gloo send/recv is a round of gloo's own socket loop and thread wake-ups;
    measured on tiny Flux, the follower's gloo thread spent 4 ms of system time per step (a step
    computes in 8 ms). Here a message is one read and one write on each side. The collectives
    inside a split call (a token shard's keys and values) still go through `torch.distributed`.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self.sock = sock
        self._sending = threading.Lock()  # a message's pieces go out together, whichever thread sends

    def send(self, message: dict[str, Any]) -> None:
        """Send `message` (any structure of dicts, lists, scalars and tensors; tensors from any
        device travel through host memory)."""
        tensors: list[torch.Tensor] = []
        text = json.dumps(flatten(message, tensors)).encode()
        text += b" " * (-len(text) % _ALIGN)  # the data after it stays aligned (JSON ignores the spaces)
        data = _pack([t.detach().cpu() for t in tensors])
        with self._sending:
            self.sock.sendall(struct.pack("<QQ", len(text), data.numel()) + text)
            if data.numel():
                self.sock.sendall(memoryview(data.numpy()))

    def recv(self, device: torch.device) -> dict[str, Any]:
        """The next message; its tensors land on `device`. ConnectionError once the other end is gone."""
        header_len, data_len = struct.unpack("<QQ", self._exactly(torch.empty(16, dtype=torch.uint8)).numpy())
        # torch's own allocation: aligned as the model's kernels want their inputs (a step of tiny
        # Flux ran 15% slower on inputs that were views at 8-byte offsets of a Python bytearray)
        raw = self._exactly(torch.empty(header_len + data_len, dtype=torch.uint8))
        spec = json.loads(raw[:header_len].numpy().tobytes())
        tensors = [t.to(device) for t in _unpack(raw[header_len:], spec)]
        message = rebuild(spec, tensors)
        if not isinstance(message, dict):
            raise ValueError("a group message must be a dict")
        return message

    def _exactly(self, buf: torch.Tensor) -> torch.Tensor:
        """`buf` (uint8), filled from the socket."""
        view, got, size = memoryview(buf.numpy()), 0, buf.numel()
        while got < size:
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionError("the other end of the group's channel is gone")
            got += n
        return buf

    def close(self) -> None:
        self.sock.close()
