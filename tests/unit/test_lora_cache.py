"""LoraCache: adapters switched on one shared transformer give each request what a transformer
holding only that request's LoRAs would give; the byte budget evicts least recently used
adapters, and an evicted adapter comes back correctly; once full, a missing LoRA is swapped
into the least recently used slot, and one the slot cannot take is loaded anew, both giving
exactly a fresh transformer's result."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the hub

from dataclasses import dataclass

import pytest
import torch

from services.denoiser.denoise import denoise
from services.denoiser.loop import DenoiseInputs
from services.denoiser.lora import LoraCache
from services.encoder.model import encode
from shared.settings import Settings
from shared.zoo import load_denoiser, load_text_encoder, lora_path

KW = {"height": 32, "width": 32, "num_inference_steps": 2, "guidance_scale": 3.0, "seed": 4}


@dataclass
class Case:
    settings: Settings
    inputs: dict[str, dict[str, torch.Tensor]]


@pytest.fixture(scope="module")
def case(settings: Settings) -> Case:
    clip_l, clip_g, t5 = (load_text_encoder(m, settings) for m in ("clip-l", "clip-g", "t5"))
    texts = ["a red boat", ""]
    l_out, g_out = encode(clip_l, texts), encode(clip_g, texts)
    sd3 = {
        "clip_l_embeds": l_out["embeds"],
        "clip_l_pooled": l_out["pooled"],
        "clip_g_embeds": g_out["embeds"],
        "clip_g_pooled": g_out["pooled"],
        "t5_embeds": encode(t5, texts)["embeds"],
    }
    flux = {
        "clip_l_pooler": encode(clip_l, texts, outputs=("pooler",))["pooler"],
        "t5_embeds": encode(t5, texts, max_sequence_length=512)["embeds"],
    }
    return Case(settings=settings, inputs={"sd3-transformer": sd3, "flux-transformer": flux})


def _run(case: Case, bundle, cache: LoraCache, loras: list[tuple[str, float]]) -> torch.Tensor:
    with cache.activate(loras, lambda name: lora_path(name, case.settings)):
        return denoise(bundle, DenoiseInputs(case.inputs[bundle.model_id], **KW))


def _alone(case: Case, model_id: str, loras: list[tuple[str, float]]) -> torch.Tensor:
    """A fresh transformer holding only these LoRAs."""
    bundle = load_denoiser(model_id, case.settings)
    return _run(case, bundle, LoraCache(bundle.transformer, max_bytes=1 << 30), loras)


@pytest.mark.parametrize("model_id", ["sd3-transformer", "flux-transformer"])
def test_switching_gives_each_set_its_own_result(case: Case, model_id: str) -> None:
    fam = model_id.removesuffix("-transformer")
    a, b = f"{fam}-lora-a", f"{fam}-lora-b"
    sets = [[(a, 1.0)], [(b, 0.8)], [], [(a, 1.0)], [(b, 0.5), (a, 0.7)], [(a, 0.5)], []]
    expected = {i: _alone(case, model_id, s) for i, s in enumerate(sets) if s not in sets[:i]}
    bundle = load_denoiser(model_id, case.settings)
    cache = LoraCache(bundle.transformer, max_bytes=1 << 30)
    for i, loras in enumerate(sets):
        want = expected[sets.index(loras)]
        assert torch.equal(_run(case, bundle, cache, loras), want), f"step {i}: {loras}"
    assert list(cache.loaded()) == [b, a]  # least recently used first
    assert torch.equal(_alone(case, model_id, []), expected[2])  # no LoRA: exactly the base model


def test_budget_evicts_least_recently_used_and_reloads(case: Case) -> None:
    bundle = load_denoiser("sd3-transformer", case.settings)
    probe = LoraCache(bundle.transformer, max_bytes=1 << 30)
    probe.activate_now([("sd3-lora-a", 1.0)], lambda n: lora_path(n, case.settings))
    probe.deactivate()
    size = probe.loaded()["sd3-lora-a"]
    assert size > 0

    bundle = load_denoiser("sd3-transformer", case.settings)
    cache = LoraCache(bundle.transformer, max_bytes=size)  # room for one adapter
    want_a = _alone(case, "sd3-transformer", [("sd3-lora-a", 1.0)])
    want_b = _alone(case, "sd3-transformer", [("sd3-lora-b", 1.0)])
    assert torch.equal(_run(case, bundle, cache, [("sd3-lora-a", 1.0)]), want_a)
    assert torch.equal(_run(case, bundle, cache, [("sd3-lora-b", 1.0)]), want_b)
    assert list(cache.loaded()) == ["sd3-lora-b"]  # a evicted: b swapped into its slot
    assert len(bundle.transformer.peft_config) == 1
    assert cache.counts == {"load": 1, "swap": 1}
    assert torch.equal(_run(case, bundle, cache, [("sd3-lora-a", 1.0)]), want_a)  # back, swapped in again
    assert list(cache.loaded()) == ["sd3-lora-a"] and cache.total_bytes() == size
    assert cache.counts == {"load": 1, "swap": 2}

    # One request's own LoRAs are never evicted for each other, even over budget.
    both = [("sd3-lora-a", 0.6), ("sd3-lora-b", 0.6)]
    assert torch.equal(_run(case, bundle, cache, both), _alone(case, "sd3-transformer", both))
    assert set(cache.loaded()) == {"sd3-lora-a", "sd3-lora-b"}
    _run(case, bundle, cache, [("sd3-lora-b", 1.0)])
    assert list(cache.loaded()) == ["sd3-lora-b"]  # back within budget at the next request


def test_bad_requests(case: Case) -> None:
    bundle = load_denoiser("sd3-transformer", case.settings)
    cache = LoraCache(bundle.transformer, max_bytes=1 << 30)
    with pytest.raises(ValueError, match="once"):
        cache.activate_now([("sd3-lora-a", 1.0), ("sd3-lora-a", 0.5)], lambda n: lora_path(n, case.settings))
    with pytest.raises(ValueError, match="unknown LoRA"):
        lora_path("no-such-lora", case.settings)
    # An exception inside the request still switches LoRA off afterwards.
    with pytest.raises(RuntimeError), cache.activate([("sd3-lora-a", 1.0)], lambda n: lora_path(n, case.settings)):
        raise RuntimeError("denoise failed")
    assert torch.equal(
        denoise(bundle, DenoiseInputs(case.inputs["sd3-transformer"], **KW)), _alone(case, "sd3-transformer", [])
    )


def test_a_lora_the_slot_cannot_take_is_loaded_anew(case: Case) -> None:
    """A slot holds the layers of the LoRA first loaded into it. A LoRA on fewer layers swaps in
    (the others zeroed); one on a layer the slot lacks cannot, and is loaded the old way."""
    from services.denoiser.lora_host import LoraTensors, read_lora

    full = read_lora(lora_path("sd3-lora-a", case.settings))
    first_block = {k: v for k, v in full.state.items() if ".transformer_blocks.0." in k}
    assert 0 < len(first_block) < len(full.state)
    sources = {"a": full, "a-block0": LoraTensors(first_block, full.metadata, 0)}
    path_of = sources.__getitem__

    def alone(name: str) -> torch.Tensor:
        bundle = load_denoiser("sd3-transformer", case.settings)
        with LoraCache(bundle.transformer, max_bytes=1 << 30).activate([(name, 1.0)], path_of):
            return denoise(bundle, DenoiseInputs(case.inputs["sd3-transformer"], **KW))

    want = {name: alone(name) for name in sources}
    assert not torch.equal(want["a"], want["a-block0"])
    bundle = load_denoiser("sd3-transformer", case.settings)
    cache = LoraCache(bundle.transformer, max_bytes=1 << 30, max_adapters=1)

    def run(name: str) -> torch.Tensor:
        with cache.activate([(name, 1.0)], path_of):
            return denoise(bundle, DenoiseInputs(case.inputs["sd3-transformer"], **KW))

    assert torch.equal(run("a-block0"), want["a-block0"])
    assert torch.equal(run("a"), want["a"])  # layers the slot lacks: deleted, loaded anew
    assert cache.counts == {"load": 2} and len(bundle.transformer.peft_config) == 1
    assert torch.equal(run("a-block0"), want["a-block0"])  # fewer layers: swapped in, the rest zeroed
    assert cache.counts == {"load": 2, "swap": 1} and len(bundle.transformer.peft_config) == 1
    assert list(cache.loaded()) == ["a-block0"]
