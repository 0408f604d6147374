"""How one transformer call is cut over d devices, and put back together.

A call's rows are independent: with classifier-free guidance its rows are [uncond, cond] (each
n images), so cutting the rows in two is CFG parallelism, and only the noise prediction comes
back. Where the rows do not divide (Flux's guidance is distilled: one row per image), each row
part's image tokens are cut into s shards (sequence parallelism, `sequence.py`). A degree d is
laid out as r row parts x s token shards, r x s = d, rows first (they need no exchange inside
the model).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from services.denoiser.group.sequence import take
from services.denoiser.loop import TransformerCall


@dataclass(frozen=True)
class Layout:
    """r row parts, each over s token shards: devices [i*s, (i+1)*s) of the call's set run part i."""

    rows: int
    shards: int

    @property
    def degree(self) -> int:
        return self.rows * self.shards


@dataclass(frozen=True)
class Part:
    """What one device runs of a call: its `call` (rows and, for Flux, tokens already cut), its
    shard `index` of `shards` within its row part, and whether its output is wanted (the first
    shard of each row part answers for all of them: the tokens are gathered before the head)."""

    call: TransformerCall
    index: int = 0
    shards: int = 1
    text_len: int = 0

    @property
    def answers(self) -> bool:
        return self.index == 0


def tokens(call: TransformerCall) -> int:
    """Image tokens of a call: Flux's packed tokens (batch, tokens, channels), or an MMDiT's
    patches of the latent image (batch, channels, height, width) at `patch_size` 2."""
    latent = call.batched.get("hidden_states")
    if not isinstance(latent, torch.Tensor):
        return 0
    if latent.ndim == 3:
        return int(latent.shape[1])
    return int(latent.shape[-2] // 2) * int(latent.shape[-1] // 2)


def layout(degree: int, call: TransformerCall, by_tokens: bool) -> Layout | None:
    """The way to run `call` over `degree` devices (rows first), or None when it cannot be.
    `by_tokens`: whether the model can split its image tokens (`sequence.install`)."""
    rows = call.rows()
    for r in sorted({d for d in range(1, degree + 1) if degree % d == 0}, reverse=True):
        s = degree // r
        if rows % r:
            continue
        if s > 1 and (not by_tokens or tokens(call) % s):
            continue
        return Layout(rows=r, shards=s)
    return None


def _rows(value: Any, index: int, parts: int) -> Any:
    """Row part `index` of `parts` of a batched argument (tensors, lists of them, dicts, None)."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: _rows(v, index, parts) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rows(v, index, parts) for v in value]
    return value.chunk(parts, dim=0)[index]


def _token_shard(call: TransformerCall, index: int, shards: int) -> TransformerCall:
    """Flux: cut the packed tokens, their position ids and the ControlNet residuals (all per
    image token); SD3: cut only the ControlNet residuals (its tokens are cut after the patch
    embedding, inside the model)."""
    batched, shared = dict(call.batched), dict(call.shared)
    if isinstance(batched.get("hidden_states"), torch.Tensor) and batched["hidden_states"].ndim == 3:
        batched["hidden_states"] = take(batched["hidden_states"], 1, index, shards)
        shared["img_ids"] = take(shared["img_ids"], 0, index, shards)
    for name in ("controlnet_block_samples", "controlnet_single_block_samples", "block_controlnet_hidden_states"):
        if batched.get(name) is not None:
            batched[name] = [take(t, 1, index, shards) for t in batched[name]]
    return replace(call, batched=batched, shared=shared)


def _text_len(call: TransformerCall) -> int:
    text = call.batched.get("encoder_hidden_states")
    return int(text.shape[1]) if isinstance(text, torch.Tensor) and text.ndim == 3 else 0


def split(call: TransformerCall, how: Layout) -> list[Part]:
    """One Part per device, in device order."""
    parts = []
    for i in range(how.rows):
        rows = replace(call, batched={k: _rows(v, i, how.rows) for k, v in call.batched.items()})
        for j in range(how.shards):
            part_call = rows if how.shards == 1 else _token_shard(rows, j, how.shards)
            parts.append(Part(call=part_call, index=j, shards=how.shards, text_len=_text_len(call)))
    return parts


def merge(outputs: list[torch.Tensor | None], how: Layout) -> torch.Tensor:
    """The whole call's output from the devices' (only the answering shards' are read)."""
    answers = [outputs[i * how.shards] for i in range(how.rows)]
    if any(a is None for a in answers):
        raise RuntimeError("a device of the group returned no output for its part")
    return answers[0] if how.rows == 1 else torch.cat(answers, dim=0)  # type: ignore[arg-type]
