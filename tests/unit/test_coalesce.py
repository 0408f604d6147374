"""Coalescing one-shot model calls (shared/coalesce.py) and the encoder's batched texts.

What a user would notice: under load, queued steps of one model share a call; steps that
cannot (other options) never do; one bad input fails only its own step; and a step's
embeddings are its own (alone: bit for bit the pipeline's; batched: up to float rounding).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import threading

import pytest
import torch

from services.encoder.runner import EncoderRunner
from shared.coalesce import Coalescer, max_batch
from shared.settings import Settings
from shared.zoo import load_text_encoder


def test_queued_items_share_calls_by_key_oldest_first() -> None:
    started, release = threading.Event(), threading.Event()
    calls: list[list[str]] = []

    def run_many(items: list[str]) -> list[str]:
        calls.append(items)
        started.set()
        release.wait(10)  # the first call holds the engine while the rest queue up
        return [item.upper() for item in items]

    c = Coalescer(run_many, key=lambda item: item[0], max_batch=3)
    try:
        futures = [c.submit("a0")]
        assert started.wait(10)
        futures += [c.submit(item) for item in ["a1", "b0", "a2", "a3", "b1", "a4"]]
        release.set()
        assert [f.result(10) for f in futures] == ["A0", "A1", "B0", "A2", "A3", "B1", "A4"]
    finally:
        c.close()
    # a0 alone (it started before the rest arrived), then by key and age, at most 3 per call.
    assert calls[0] == ["a0"]
    assert calls[1:] == [["a1", "a2", "a3"], ["b0", "b1"], ["a4"]]
    assert c.batch_sizes == {1: 2, 3: 1, 2: 1}


def test_a_bad_item_fails_alone() -> None:
    def run_many(items: list[int]) -> list[int]:
        if any(i < 0 for i in items):
            raise ValueError(f"negative input in {items}")
        return [i * 2 for i in items]

    gate = threading.Event()
    c = Coalescer(lambda items: gate.wait(10) and run_many(items), key=lambda i: 0, max_batch=8)
    try:
        futures = [c.submit(i) for i in (1, 2, -3, 4)]
        gate.set()
        assert futures[0].result(10) == 2 and futures[1].result(10) == 4 and futures[3].result(10) == 8
        with pytest.raises(ValueError, match="negative"):
            futures[2].result(10)
    finally:
        c.close()


def test_max_batch_defaults_to_batching_only_on_a_gpu() -> None:
    assert max_batch(0, "cpu", gpu_default=16) == 1
    assert max_batch(0, "cuda", gpu_default=16) == 16
    assert max_batch(4, "cpu", gpu_default=16) == 4


@pytest.mark.parametrize("model_id,options", [("t5", {"max_sequence_length": 256}), ("clip-l", {}), ("clip-g", {})])
def test_encoder_batches_texts_of_several_steps(settings: Settings, model_id: str, options: dict) -> None:
    runner = EncoderRunner(model_id=model_id, bundle=load_text_encoder(model_id, settings))
    items = [(["a red fox", ""], options), (["a blue whale", "blurry"], options), (["a tiny house"], options)]
    together = runner._encode_many(items)
    for item, got in zip(items, together, strict=True):
        [alone] = runner._encode_many([item])
        assert got.keys() == alone.keys()
        for name in alone:
            assert got[name].shape == alone[name].shape
            assert torch.allclose(got[name], alone[name], atol=1e-5), (name, (got[name] - alone[name]).abs().max())
    assert not torch.allclose(together[0]["embeds"][0], together[1]["embeds"][0])  # each its own


def test_vae_decodes_queued_latents_of_one_shape_together(settings: Settings) -> None:
    from services.vae.runner import VaeRunner
    from shared.zoo import load_vae

    runner = VaeRunner(model_id="sd3-vae", bundle=load_vae("sd3-vae", settings))
    gen = torch.Generator().manual_seed(0)
    batch = [torch.randn(n, 16, 8, 8, generator=gen) for n in (1, 2, 1)]
    together = runner._decode_many(batch)
    for latents, got in zip(batch, together, strict=True):
        [alone] = runner._decode_many([latents])
        assert got.shape == alone.shape == (latents.shape[0], 64, 64, 3)
        assert (got.int() - alone.int()).abs().max() <= 1  # uint8 pixels: at most a rounding apart
    assert not torch.equal(together[0][0], together[2][0])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_adapters_run_queued_controlnet_steps_as_one_call(settings: Settings, family: str) -> None:
    """Three requests' ControlNet steps (as their denoisers send them) in one call: each gets
    its own residuals, up to float rounding."""
    import services.denoiser.families  # noqa: F401  (registers every family's loop)
    from services.adapters.runner import ControlNetRunner, _call_key
    from services.denoiser.loop import ControlSpec, DenoiseInputs, denoise, warm_up_inputs
    from services.vae.model import encode_control_image
    from shared.zoo import load_controlnet, load_denoiser, load_vae

    model = f"{family}-controlnet"
    runner = ControlNetRunner(model_id=model, bundle=load_controlnet(model, settings))
    denoiser = load_denoiser(f"{family}-transformer", settings)
    vae = load_vae("flux-vae" if family == "flux" else "sd3-vae", settings)
    calls = []

    def capture(constant, varying, params):  # what the denoiser would send the adapters
        calls.append((constant, {k: v.clone() for k, v in varying.items()}, dict(params)))
        return runner._residuals_many([calls[-1]])[0]

    for seed in (1, 2, 3):
        gen = torch.Generator().manual_seed(seed)
        inputs = {k: torch.randn(v.shape, generator=gen) for k, v in warm_up_inputs(denoiser).items()}
        pixels = torch.randint(0, 255, (64, 64, 3), dtype=torch.uint8, generator=gen)
        latents = encode_control_image(vae, pixels, family=family, height=64, width=64, seed=seed, guidance_scale=4.0)
        control = ControlSpec(control_latents=latents, conditioning_scale=0.7, residuals=capture)
        kw = {"height": 64, "width": 64, "num_inference_steps": 1, "guidance_scale": 4.0, "seed": seed}
        denoise(denoiser, DenoiseInputs(inputs, **kw, control=control))
    assert len({_call_key(c) for c in calls}) == 1  # alike: they may run together
    together = runner._residuals_many(calls)
    for call, got in zip(calls, together, strict=True):
        [alone] = runner._residuals_many([call])
        assert got.keys() == alone.keys() and got
        for name in alone:
            assert torch.allclose(got[name], alone[name], atol=1e-5), (name, (got[name] - alone[name]).abs().max())
