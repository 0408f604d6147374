"""A model replica's cache of step inputs that stay the same for the whole request."""

from __future__ import annotations

from collections import OrderedDict

from shared.messages import TensorRef
from shared.tensor_plane import RawTensor


class InputCache:
    """Inputs a step marks as constant for its request (`ControlNetParams.cache_inputs`), kept after
    the first pull. Why: a ControlNet is called at every denoising step with the same prompt
    embeddings and control latents; pulling them once per request, not once per step, saves
    a transfer per step. Refs are immutable (a key is never reused), so a hit is always right.
    Entries go when their request is released, or oldest first beyond `max_bytes`."""

    def __init__(self, max_bytes: int = 512 * 2**20) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[str, RawTensor]] = OrderedDict()
        self._bytes = 0

    def get(self, ref: TensorRef) -> RawTensor | None:
        entry = self._entries.get(ref.key)
        if entry is None:
            return None
        self._entries.move_to_end(ref.key)
        return entry[1]

    def put(self, ref: TensorRef, owner: str, raw: RawTensor) -> None:
        if ref.key in self._entries or raw.nbytes > self.max_bytes:
            return
        self._entries[ref.key] = (owner, raw)
        self._bytes += raw.nbytes
        while self._bytes > self.max_bytes:
            _, (_, old) = self._entries.popitem(last=False)
            self._bytes -= old.nbytes

    def drop(self, owner: str) -> None:
        for key in [k for k, (o, _) in self._entries.items() if o == owner]:
            self._bytes -= self._entries.pop(key)[1].nbytes
