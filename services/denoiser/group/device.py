"""What every rank of a group does with its part of a call: switch to the call's LoRAs, run
the transformer (as a token shard when the part is one), hand back the output.

Why one class for the leader's own device and the followers': the leader (rank 0) runs its
parts in-process, a follower runs them on receiving them; both must do exactly the same, so
that a split request is the unsplit one whichever ranks run it.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import Any

import torch

from services.denoiser.group import sequence
from services.denoiser.group.split import Part
from services.denoiser.loop import call_transformer

LoraSet = tuple[tuple[str, float], ...]


class Device:
    """One rank's model: the bundle's network with sequence parallelism installed, its LoRAs.

    `activate_loras(chosen)` switches the network's LoRA set (the denoiser's `LoraCache`);
    `shard_groups[(first, size)]`: the process group of devices [first, first + size) of the
    group, for the token shards of a part run over them.
    """

    def __init__(
        self,
        index: int,
        transformer: torch.nn.Module,
        activate_loras: Callable[[list[tuple[str, float]]], None],
        shard_groups: dict[tuple[int, int], Any],
    ) -> None:
        self.index = index  # the device's place in the group (0..k-1)
        self.transformer = transformer
        self.by_tokens = sequence.install(transformer)
        self._activate_loras = activate_loras
        self._loras_on: LoraSet | None = None
        self._shard_groups = shard_groups
        self._busy = threading.Lock()  # a follower runs parts and its hosted loops' calls in turn

    def run(self, part: Part, loras: LoraSet) -> torch.Tensor | None:
        """Run `part`; its output if it answers for its row part, else None."""
        with self._busy:
            return self._run(part, loras)

    def _run(self, part: Part, loras: LoraSet) -> torch.Tensor | None:
        if loras != self._loras_on:
            self._loras_on = None  # unknown until the switch succeeds
            self._activate_loras(list(loras))
            self._loras_on = loras
        shard = None
        if part.shards > 1:
            first = self.index - part.index
            group = self._shard_groups[(first, part.shards)]
            shard = sequence.SeqShard(index=part.index, size=part.shards, group=group, text_len=part.text_len)
        with torch.inference_mode(), sequence.shard(shard):
            out = call_transformer(self.transformer, part.call)
        return out if part.answers else None


def weights_digest(transformer: torch.nn.Module) -> int:
    """A 63-bit digest of the network's parameters (per tensor: its sum, its sum of squares and
    its first values, computed where it lives): the ranks of a group compare theirs at start,
    since a split request is only the unsplit one if every device holds the same weights."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(transformer.state_dict().items()):
            flat = p.detach().flatten().double()
            stats = torch.stack([flat.sum(), (flat * flat).sum()]).cpu()
            h.update(name.encode())
            h.update(stats.numpy().tobytes())
            h.update(flat[:64].cpu().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "big") >> 1


def block_groups(world: int) -> list[tuple[int, int]]:
    """The (first, size) blocks of devices a part may be split over: aligned blocks of 2 and 4
    within the group. Every rank creates their process groups in this same order."""
    return [(first, size) for size in (2, 4) if size <= world for first in range(0, world, size)]
