"""HostLoraCache: LoRA files in host memory, bounded in bytes, least recently used evicted first,
never evicting a LoRA a running request holds; one read per file however many ask. And a
LoRA loaded from those in-memory tensors gives exactly what loading its file gives."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import threading
from collections import Counter
from pathlib import Path

import pytest

from services.denoiser.lora_host import HostLoraCache, LoraTensors

SIZES = {"a": 100, "b": 100, "c": 100, "d": 100, "big": 300}


class FakeDisk:
    """Reads `path` (a key of SIZES) as a LoRA of that many bytes, counting reads."""

    def __init__(self) -> None:
        self.reads: Counter[str] = Counter()
        self.gate: threading.Event | None = None  # a read waits for it when set

    def __call__(self, path: str | Path) -> LoraTensors:
        if self.gate is not None:
            self.gate.wait(timeout=10)
        name = str(path)
        if name not in SIZES:
            raise FileNotFoundError(name)
        self.reads[name] += 1
        return LoraTensors(state={}, metadata=None, nbytes=SIZES[name])


def cache_of(max_bytes: int) -> tuple[HostLoraCache, FakeDisk]:
    disk = FakeDisk()
    return HostLoraCache(max_bytes, read=disk), disk


def test_bytes_bound_evicts_least_recently_used() -> None:
    cache, disk = cache_of(250)
    cache.get("a", "a")
    cache.get("b", "b")
    cache.get("a", "a")  # a is now the most recently used
    cache.get("c", "c")
    assert cache.keys() == ["a", "c"]  # b went: least recently used
    assert cache.total_bytes() == 200 <= cache.max_bytes
    cache.get("b", "b")
    assert disk.reads["b"] == 2  # evicted means read again
    assert cache.keys() == ["c", "b"]


def test_a_held_lora_stays_while_its_request_runs() -> None:
    cache, disk = cache_of(250)
    with cache.holding(["a"]):
        cache.get("a", "a")
        for key in ("b", "c", "d"):
            cache.get(key, key)
        assert cache.keys() == ["a", "d"]  # a, least recently used, stays: held; b and c went
        cache.get("a", "a")
        assert disk.reads["a"] == 1
    assert not cache.held("a")
    cache.get("b", "b")
    assert cache.keys() == ["a", "b"]  # released: a is evictable again (d was least recently used)


def test_held_loras_may_exceed_the_budget_until_released() -> None:
    cache, _ = cache_of(150)
    with cache.holding(["a", "big"]):
        cache.get("a", "a")
        cache.get("big", "big")
        assert cache.keys() == ["a", "big"] and cache.total_bytes() == 400
    assert cache.total_bytes() == 0


def test_prefetch_reads_once_and_the_step_then_hits() -> None:
    cache, disk = cache_of(1000)
    disk.gate = threading.Event()
    future = cache.prefetch("a", "a")
    assert cache.prefetch("a", "a") is future  # already in flight: the same read
    got: list[LoraTensors] = []
    waiter = threading.Thread(target=lambda: got.append(cache.get("a", "a")))  # a step, during the read
    waiter.start()
    disk.gate.set()
    waiter.join(timeout=10)
    assert future.result(timeout=10).nbytes == 100 and got == [future.result()]
    assert disk.reads["a"] == 1  # one read for the two hints and the step
    hits = cache.hits
    cache.get("a", "a")
    assert cache.hits == hits + 1 and disk.reads["a"] == 1
    cache.close()


def test_a_failed_read_raises_and_is_tried_again() -> None:
    cache, _ = cache_of(1000)
    with pytest.raises(FileNotFoundError):
        cache.get("x", "missing")
    SIZES["later"] = 10
    try:
        assert cache.get("x", "later").nbytes == 10
    finally:
        del SIZES["later"]


def test_tensors_in_memory_load_as_the_file_does(settings) -> None:
    """The device cache loading a LoRA from the host cache's tensors gives the image that
    loading its file (load_lora_weights' way) gives, for SD3 and Flux."""
    import torch

    from services.denoiser.lora import LoraCache
    from services.denoiser.lora_host import read_lora
    from shared.zoo import load_denoiser, lora_path

    for model_id, name in (("sd3-transformer", "sd3-lora-b"), ("flux-transformer", "flux-lora-a")):
        outs = []
        for source in (lora_path(name, settings), read_lora(lora_path(name, settings))):
            bundle = load_denoiser(model_id, settings)
            cache = LoraCache(bundle.transformer, max_bytes=1 << 30)
            cache.activate_now([(name, 0.7)], lambda _key, source=source: source)
            outs.append({k: v.detach().clone() for k, v in bundle.transformer.state_dict().items() if "lora" in k})
        assert outs[0].keys() == outs[1].keys() and outs[0]
        assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_the_device_cache_caps_its_adapters_too(settings) -> None:
    """Bytes aside, at most `max_adapters` stay in the network, least recently used going first."""
    from services.denoiser.lora import LoraCache
    from shared.zoo import load_denoiser, lora_path

    bundle = load_denoiser("sd3-transformer", settings)
    cache = LoraCache(bundle.transformer, max_bytes=1 << 30, max_adapters=2)
    file = lora_path("sd3-lora-a", settings)
    for key in ("one", "two", "one", "three"):
        cache.activate_now([(key, 1.0)], lambda _key: file)
    assert list(cache.loaded()) == ["one", "three"]
    assert len(bundle.transformer.peft_config) == 2  # "three" took "two"'s slot: two adapters in the network
    assert cache.counts == {"load": 2, "hit": 1, "swap": 1}
    cache.activate_now([("two", 1.0), ("three", 0.5), ("one", 0.5)], lambda _key: file)
    assert len(cache.loaded()) == 3  # a request's own LoRAs are never evicted for each other
    assert len(bundle.transformer.peft_config) == 3


def test_a_deleted_lora_is_freed_once_no_request_holds_it() -> None:
    cache, _ = cache_of(1000)
    cache.get("a", "a")
    cache.get("b", "b")
    cache.forget("a")  # nobody holds it: gone at once
    assert cache.keys() == ["b"]
    with cache.holding(["b"]):
        cache.forget("b")  # a request is using it: it stays for that request
        assert cache.get("b", "b").nbytes == 100 and cache.keys() == ["b"]
    assert cache.keys() == []  # the last holder let go
