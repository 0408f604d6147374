"""LoRA files read without torch: the safetensors header, and which base model a LoRA fits.

Why torch-free: the gateway checks a LoRA at registration (is it safetensors, which base does
it fit) and must not import torch. A safetensors file is an 8-byte little-endian header length,
a JSON header naming every tensor's dtype, shape and byte range, then raw bytes; reading the
header alone answers both questions and never runs code from the file (no pickles anywhere).

Which base fits: a LoRA in the diffusers/peft format names, per adapted linear layer,
`<module>.lora_A.weight` (rank x in) and `<module>.lora_B.weight` (out x rank), optionally under
`transformer.`; it fits a base whose `<module>.weight` is (out x in). The base's shapes come from
the header of its own weights (`<family dir>/transformer/*.safetensors`), so the check holds
for the tiny zoo and for real weights alike.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
_A_MARKERS = (".lora_A.", ".lora_down.")
_B_MARKERS = (".lora_B.", ".lora_up.")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes


class LoraFileError(ValueError):
    """A file that is not a LoRA this mesh can load; the message says what is wrong."""


def weights_file(path: str | Path) -> Path:
    """The safetensors file of a LoRA given as a file or as a directory holding `WEIGHT_NAME`."""
    path = Path(path)
    return path / WEIGHT_NAME if path.is_dir() else path


def header_of_bytes(head: bytes, total: int) -> dict[str, Any]:
    """The tensors a safetensors file declares ({name: {dtype, shape, data_offsets}}), checked
    against its size `total`; `head` holds at least its first 8 + header-length bytes."""
    if len(head) < 8:
        raise LoraFileError("not a safetensors file: shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", head[:8])
    if length > MAX_HEADER_BYTES or 8 + length > total:
        raise LoraFileError("not a safetensors file: its header length does not fit the file")
    try:
        header = json.loads(head[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LoraFileError("not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise LoraFileError("not a safetensors file: its header is not a JSON object")
    header.pop("__metadata__", None)
    data = total - 8 - length
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            ok = 0 <= start <= end <= data and all(isinstance(d, int) and d >= 0 for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise LoraFileError(f"not a safetensors file: tensor {name!r} is declared badly")
    return header


def read_header(path: str | Path) -> dict[str, Any]:
    """`header_of_bytes` of a file on disk (reads only the header)."""
    file = weights_file(path)
    try:
        with open(file, "rb") as f:
            size = file.stat().st_size
            head = f.read(8)
            if len(head) == 8:
                (length,) = struct.unpack("<Q", head)
                head += f.read(min(length, MAX_HEADER_BYTES))
    except OSError as exc:
        raise LoraFileError(f"cannot read {file}: {exc.strerror or exc}") from None
    return header_of_bytes(head, size)


def lora_modules(header: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """{module: (in, out)} of every layer a LoRA adapts; LoraFileError if it is not one in the
    diffusers/peft format (the format `save_lora_weights` writes)."""
    a_shapes: dict[str, list[int]] = {}
    b_shapes: dict[str, list[int]] = {}
    for name, info in header.items():
        for markers, into in ((_A_MARKERS, a_shapes), (_B_MARKERS, b_shapes)):
            for marker in markers:
                if marker in name:
                    into[name.split(marker)[0].removeprefix("transformer.")] = list(info["shape"])
    if not a_shapes or set(a_shapes) != set(b_shapes):
        raise LoraFileError(
            "not a LoRA in the diffusers format: expected pairs of '<module>.lora_A.weight' and "
            "'<module>.lora_B.weight' tensors (what diffusers' save_lora_weights writes)"
        )
    modules = {}
    for module, a in a_shapes.items():
        b = b_shapes[module]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise LoraFileError(f"LoRA layer {module!r}: lora_A {a} and lora_B {b} do not make a rank-r pair")
        modules[module] = (a[1], b[0])
    return modules


def base_modules(weights_dir: str | Path) -> dict[str, tuple[int, int]]:
    """{module: (in, out)} of every 2-D weight of a base model's directory (its safetensors files)."""
    files = sorted(Path(weights_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {weights_dir}")
    modules = {}
    for file in files:
        for name, info in read_header(file).items():
            if name.endswith(".weight") and len(info["shape"]) == 2:
                out, inp = info["shape"]
                modules[name.removesuffix(".weight")] = (inp, out)
    return modules


def misfit(lora: dict[str, tuple[int, int]], base: dict[str, tuple[int, int]]) -> str | None:
    """Why a LoRA does not fit a base (None when it does): the first layer missing or of another shape."""
    for module, (inp, out) in sorted(lora.items()):
        if module not in base:
            return f"the base has no layer {module!r}"
        if base[module] != (inp, out):
            return f"layer {module!r} is {base[module][0]}->{base[module][1]} in the base, {inp}->{out} in the LoRA"
    return None
