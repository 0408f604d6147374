"""Reading a LoRA file without torch (what the gateway does at registration): a file is taken
only if its safetensors header is sound, and a LoRA fits a base only if every layer it adapts
exists there with the same shape."""

from __future__ import annotations

import json
import struct

import pytest

from shared.lora_files import LoraFileError, header_of_bytes, lora_modules, misfit


def safetensors_bytes(tensors: dict[str, list[int]], data: int | None = None) -> bytes:
    """A safetensors file of float32 tensors of these shapes (zeros), or a lying one."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4 * (shape[0] * shape[1] if len(shape) == 2 else shape[0])
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * (offset if data is None else data)


def test_a_sound_header_is_read() -> None:
    blob = safetensors_bytes({"a.lora_A.weight": [4, 8], "a.lora_B.weight": [16, 4]})
    assert set(header_of_bytes(blob, len(blob))) == {"a.lora_A.weight", "a.lora_B.weight"}


@pytest.mark.parametrize(
    "blob",
    [
        b"\x00\x01",  # shorter than the length field
        struct.pack("<Q", 10**9) + b"{}",  # a header longer than the file
        struct.pack("<Q", 2) + b"[]",  # not an object
        safetensors_bytes({"a.lora_A.weight": [4, 8]}, data=10),  # tensor bytes past the end
    ],
    ids=["short", "header-past-end", "not-object", "data-past-end"],
)
def test_a_broken_file_is_refused(blob: bytes) -> None:
    with pytest.raises(LoraFileError, match="not a safetensors file"):
        header_of_bytes(blob, len(blob))


def test_layers_and_fit() -> None:
    header = {
        "transformer.blocks.0.to_q.lora_A.weight": {"shape": [4, 8]},
        "transformer.blocks.0.to_q.lora_B.weight": {"shape": [16, 4]},
    }
    layers = lora_modules(header)
    assert layers == {"blocks.0.to_q": (8, 16)}
    assert misfit(layers, {"blocks.0.to_q": (8, 16)}) is None
    assert "8->32 in the base" in (misfit(layers, {"blocks.0.to_q": (8, 32)}) or "")
    assert "no layer 'blocks.0.to_q'" in (misfit(layers, {}) or "")


def test_a_file_without_lora_pairs_is_no_lora() -> None:
    with pytest.raises(LoraFileError, match="diffusers format"):
        lora_modules({"weight": {"shape": [2, 2]}})
    with pytest.raises(LoraFileError, match="rank-r pair"):
        lora_modules({"x.lora_A.weight": {"shape": [4, 8]}, "x.lora_B.weight": {"shape": [16, 2]}})
