"""Commands and results between the ranks of a group, over `torch.distributed`.

Why not `send_object_list` (which pickles): a group's ranks are processes of one replica, yet
the rule of the house holds on every channel: tensors travel as raw bytes with dtype and shape.
A message is a JSON header (its structure, with each tensor replaced by {"t": i, "dtype",
"shape"}) sent as bytes after its length, then each tensor sent as itself (`dist.send`), so on
GPUs the tensors go device to device (NCCL) while the header goes through gloo.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist

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


def send(message: dict[str, Any], dst: int, group: dist.ProcessGroup, device: torch.device) -> None:
    """Send `message` (any structure of dicts, lists, scalars and tensors) to global rank `dst`."""
    tensors: list[torch.Tensor] = []
    header = json.dumps(flatten(message, tensors)).encode()
    dist.send(torch.tensor([len(header)], dtype=torch.int64), dst, group=group)
    dist.send(torch.frombuffer(bytearray(header), dtype=torch.uint8), dst, group=group)
    for t in tensors:
        dist.send(t.to(device), dst, group=group)


def recv(src: int, group: dist.ProcessGroup, device: torch.device) -> dict[str, Any]:
    """Receive what `send` sent from global rank `src`; its tensors land on `device`."""
    size = torch.empty(1, dtype=torch.int64)
    dist.recv(size, src, group=group)
    raw = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(raw, src, group=group)
    spec = json.loads(raw.numpy().tobytes())
    tensors = []
    for _, dtype, shape in tensor_specs(spec):
        t = torch.empty(shape, dtype=_DTYPES[dtype], device=device)
        dist.recv(t, src, group=group)
        tensors.append(t)
    message = rebuild(spec, tensors)
    if not isinstance(message, dict):
        raise ValueError("a group message must be a dict")
    return message
