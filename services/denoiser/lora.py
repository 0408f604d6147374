"""LoRA adapters on a shared base transformer: loaded once, kept within a byte budget, switched per request.

Why a cache: loading a LoRA file costs far more than switching adapters, and a denoiser
serves many requests naming a few LoRAs. Each named adapter is loaded into the transformer
once (by the same code diffusers' `pipe.load_lora_weights` runs for the transformer), kept
while its parameters fit in `max_bytes` and `max_adapters` (least recently used out first),
and for each request `set_adapters(slots, weights)` activates the request's set; afterwards
LoRA is disabled, so a request without LoRAs gets exactly the base model's output (disabled
peft layers return the base layer's result untouched).

Slots, swapped in place. An adapter lives in a named peft slot (`lego-slot-N`), not under its
LoRA's name. Once the cache is full, a LoRA that misses is hot-swapped into the least recently
used slot (diffusers' `hotswap=True`: its tensors copied into the slot's existing layers)
instead of deleting that adapter and injecting a new one: peft's injection builds new layers
through the whole network, about 7x the copy (full-size SD3-Medium, rank 64, CPU: 0.41 s
against 0.056 s; bench/loras.py). With a production's thousands of LoRAs a long-running
denoiser's cache is full nearly always, so nearly every miss is a swap (a new replica injects
until its slots are full). A LoRA the slot's layers cannot take (it
targets a layer the slot lacks, or its peft options differ) is loaded the old way instead.

Adapters switch for the whole model: one forward pass serves one LoRA set, so the caller
runs requests with different sets one after another. Not thread-safe: every call happens on
the denoiser's single compute thread, which also runs the forward passes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("lego.denoiser.loras")

# Where a LoRA comes from: a file or directory (read as `load_lora_weights` reads it), or its
# tensors already read into host memory (`lora_host.LoraTensors`: the same tensors and metadata).
Source = Any


def _state_dict(mixin: Any, source: Source, **flags: bool) -> tuple[Any, ...]:
    """`mixin.lora_state_dict` of a path, or of tensors in memory with the file's metadata."""
    if isinstance(source, (str, Path)):
        return tuple(mixin.lora_state_dict(str(source), return_lora_metadata=True, **flags))
    *rest, _none = mixin.lora_state_dict(dict(source.state), return_lora_metadata=True, **flags)
    return (*rest, source.metadata)


def _load_sd3(transformer: Any, path: Source, adapter_name: str, hotswap: bool = False) -> None:
    """`StableDiffusion3Pipeline.load_lora_weights`' transformer part."""
    from diffusers.loaders.lora_pipeline import SD3LoraLoaderMixin

    state, metadata = _state_dict(SD3LoraLoaderMixin, path)
    if not all("lora" in key for key in state):
        raise ValueError(f"{adapter_name}: invalid LoRA checkpoint (every parameter name must contain 'lora')")
    SD3LoraLoaderMixin.load_lora_into_transformer(
        state, transformer=transformer, adapter_name=adapter_name, metadata=metadata, hotswap=hotswap
    )


def _load_flux(transformer: Any, path: Source, adapter_name: str, hotswap: bool = False) -> None:
    """`FluxPipeline.load_lora_weights`' transformer part: its key conversion and shape expansion too."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    state, alphas, metadata = _state_dict(FluxLoraLoaderMixin, path, return_alphas=True)
    lora = {k: state.get(k) for k in list(state) if k.startswith("transformer.") and "lora" in k}
    norm_keys = FluxLoraLoaderMixin._control_lora_supported_norm_keys
    if any(k.startswith("transformer.") and any(nk in k for nk in norm_keys) for k in state):
        raise NotImplementedError(f"{adapter_name}: Control-LoRA norm layers are not supported")
    if not lora:
        raise ValueError(f"{adapter_name}: invalid LoRA checkpoint (no transformer LoRA parameters)")
    FluxLoraLoaderMixin._maybe_expand_transformer_param_shape_or_error_(transformer, lora, {})
    state |= FluxLoraLoaderMixin._maybe_expand_lora_state_dict(transformer=transformer, lora_state_dict=lora)
    FluxLoraLoaderMixin.load_lora_into_transformer(
        state,
        network_alphas=alphas,
        transformer=transformer,
        adapter_name=adapter_name,
        metadata=metadata,
        hotswap=hotswap,
    )


# How each network class a family names (`FamilyDescriptor.network`) takes a LoRA: as its
# pipeline's LoRA loader mixin loads one.
_LOADER_OF_NETWORK = {"SD3Transformer2DModel": _load_sd3, "FluxTransformer2DModel": _load_flux}


def load_lora_into_transformer(transformer: Any, path: Source, adapter_name: str, hotswap: bool = False) -> None:
    """The transformer part of `StableDiffusion3Pipeline.load_lora_weights` /
    `FluxPipeline.load_lora_weights`: same state-dict reading (and Flux's key conversion and
    shape expansion), same `load_lora_adapter` call, for a transformer without its pipeline.
    `hotswap`: into the loaded adapter `adapter_name`'s layers, replacing its tensors."""
    name = type(transformer).__name__
    if name not in _LOADER_OF_NETWORK:
        raise ValueError(f"no LoRA loader for {name}")
    _LOADER_OF_NETWORK[name](transformer, path, adapter_name, hotswap)


def _adapter_bytes(transformer: Any, name: str) -> int:
    marker = f".{name}."
    return sum(
        p.numel() * p.element_size() for key, p in transformer.named_parameters() if "lora_" in key and marker in key
    )


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    was = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = was


@dataclass
class _Slot:
    adapter: str  # the peft adapter name holding this LoRA
    nbytes: int  # its parameters' bytes


class LoraCache:
    """The LoRAs loaded into one transformer, least recently used first."""

    def __init__(self, transformer: Any, max_bytes: int, max_adapters: int = 0) -> None:
        self.transformer = transformer
        self.max_bytes = max_bytes
        # 0: no cap. Why a count beside the bytes: peft's cost to load or switch an adapter
        # grows with the adapters resident in the network (it walks every layer's adapters),
        # so thousands of tiny LoRAs would fit the bytes yet make every switch slow.
        self.max_adapters = max_adapters
        self._loaded: OrderedDict[str, _Slot] = OrderedDict()  # LoRA name -> its slot, least recent first
        self._slot_ids = itertools.count()
        self.counts: Counter[str] = Counter()  # "hit", "load" (a new slot), "swap" (into a used slot)

    def loaded(self) -> dict[str, int]:
        """Loaded adapters (least recently used first) and their parameter bytes, for /v1/models."""
        return {name: slot.nbytes for name, slot in self._loaded.items()}

    def total_bytes(self) -> int:
        return sum(slot.nbytes for slot in self._loaded.values())

    def _fits(self) -> bool:
        few_enough = not self.max_adapters or len(self._loaded) <= self.max_adapters
        return few_enough and self.total_bytes() <= self.max_bytes

    def _full(self) -> bool:
        """No room for one more adapter (as large as the largest loaded) without evicting one."""
        if not self._loaded:
            return False
        if self.max_adapters and len(self._loaded) >= self.max_adapters:
            return True
        return self.total_bytes() + max(slot.nbytes for slot in self._loaded.values()) > self.max_bytes

    def _drop(self, name: str) -> None:
        slot = self._loaded.pop(name)
        self.transformer.delete_adapters(slot.adapter)

    def _evict_for(self, keep: set[str]) -> None:
        """Delete least recently used adapters not in `keep` until the cache fits its budget."""
        for name in list(self._loaded):
            if self._fits():
                return
            if name not in keep:
                self._drop(name)

    def _swap(self, name: str, source: Source, keep: set[str]) -> bool:
        """Hot-swap `name` into the least recently used slot not in `keep`; False (that slot
        deleted) when its layers cannot take it."""
        victim = next((n for n in self._loaded if n not in keep), None)
        if victim is None:
            return False
        slot = self._loaded.pop(victim)
        try:
            with _quiet("diffusers.loaders.peft"):  # it logs an error for a swap refused: handled here
                load_lora_into_transformer(self.transformer, source, slot.adapter, hotswap=True)
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            log.info("LoRA %s cannot be swapped into %s's slot (%s); loading it anew", name, victim, exc)
            # A failed swap may leave the slot half-removed (diffusers drops its config): remove all of it.
            with contextlib.suppress(Exception):
                self.transformer.delete_adapters(slot.adapter)
            return False
        self._loaded[name] = _Slot(slot.adapter, _adapter_bytes(self.transformer, slot.adapter))
        self.counts["swap"] += 1
        return True

    def _ensure(self, name: str, path_of: Callable[[str], Source], keep: set[str]) -> None:
        if name in self._loaded:
            self._loaded.move_to_end(name)
            self.counts["hit"] += 1
            return
        source = path_of(name)
        if self._full() and self._swap(name, source, keep):
            self._evict_for(keep)  # a swapped-in LoRA of a larger rank may have grown its slot
            return
        adapter = f"lego-slot-{next(self._slot_ids)}"
        with warnings.catch_warnings():  # peft warns on every adapter after the first: that is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            load_lora_into_transformer(self.transformer, source, adapter)
        self._loaded[name] = _Slot(adapter, _adapter_bytes(self.transformer, adapter))
        self.counts["load"] += 1
        self._evict_for(keep)  # before the next load: the budget bounds the peak, not only the end

    def forget(self, name: str) -> None:
        """Delete an adapter now (a deleted LoRA); call it between calls, on the compute thread."""
        if name in self._loaded:
            self._drop(name)

    def deactivate(self) -> None:
        """Back to the base model: LoRA layers stay loaded but are bypassed."""
        if self._loaded:
            self.transformer.disable_lora()

    def activate_now(self, loras: list[tuple[str, float]], path_of: Callable[[str], Source]) -> None:
        """Load what is missing and activate `loras` [(name, scale)] in that order (none: base model).

        A request's own LoRAs are never evicted for each other: if together they exceed
        `max_bytes`, the cache holds them all until a later request lets it shrink.
        """
        names = [name for name, _ in loras]
        if len(set(names)) != len(names):
            raise ValueError(f"a LoRA may be named once per request, got {names}")
        if not loras:
            self.deactivate()
            return
        for name in names:
            self._ensure(name, path_of, keep=set(names))
        self._evict_for(keep=set(names))
        self.transformer.enable_lora()
        self.transformer.set_adapters(
            [self._loaded[name].adapter for name in names], [float(scale) for _, scale in loras]
        )

    @contextmanager
    def activate(self, loras: list[tuple[str, float]], path_of: Callable[[str], Source]) -> Iterator[None]:
        """`with cache.activate([("sd3-lora-a", 0.8)], path_of): denoise(...)`; LoRA off afterwards."""
        try:
            self.activate_now(loras, path_of)
            yield
        finally:
            self.deactivate()
