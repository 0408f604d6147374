"""Step-level batching (services/denoiser/batching.py): requests share transformer calls,
join between steps, leave when done or cancelled, and each still gets its own image.

What a user would notice: with batching on, a request's result must be its own (equal to
running it alone up to float rounding), requests that cannot share a call (another size,
another LoRA set) must not be mixed, and a cancelled request must not disturb the others.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import threading
from collections.abc import Callable

import pytest
import torch

from services.adapters.model import controlnet_residuals
from services.denoiser.batching import BatchEngine
from services.denoiser.denoise import denoise, denoise_loop, warm_up_inputs
from services.denoiser.loop import ControlSpec, DenoiseCancelled, DenoiseInputs
from services.denoiser.lora import LoraCache
from services.vae.model import encode_control_image
from shared.messages import VaeEncodeParams
from shared.settings import Settings
from shared.zoo import load_controlnet, load_denoiser, load_vae, lora_path

ATOL = 1e-4  # batched vs alone: float rounding of a matrix product over more rows, per step


def _inputs(bundle, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in warm_up_inputs(bundle).items()}


def _kw(seed: int) -> dict:
    return {"height": 64, "width": 64, "num_inference_steps": 4, "guidance_scale": 4.0, "seed": seed}


@pytest.fixture(scope="module")
def sd3(settings: Settings):
    return load_denoiser("sd3-transformer", settings)


@pytest.fixture(scope="module")
def flux(settings: Settings):
    return load_denoiser("flux-transformer", settings)


def _engine(bundle, max_batch: int = 4, activate: Callable | None = None) -> BatchEngine:
    return BatchEngine(bundle.transformer, max_batch, activate or (lambda loras: None))


def _loop(bundle, seed: int, **kw):
    args = _kw(seed) | kw
    return denoise_loop(bundle, DenoiseInputs(_inputs(bundle, seed), **args))


def _alone(bundle, seed: int, **kw) -> torch.Tensor:
    args = _kw(seed) | kw
    return denoise(bundle, DenoiseInputs(_inputs(bundle, seed), n=1, **args))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_requests_share_calls_and_each_gets_its_own_result(family: str, sd3, flux) -> None:
    bundle = sd3 if family == "sd3" else flux
    engine = _engine(bundle)
    try:
        futures = [engine.submit(_loop(bundle, seed)) for seed in (1, 2, 3)]
        results = [f.result(timeout=120) for f in futures]
    finally:
        engine.close()
    assert max(engine.batch_sizes) >= 2, engine.batch_sizes  # they did run together
    for seed, got in zip((1, 2, 3), results, strict=True):
        want = _alone(bundle, seed)
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=ATOL), (seed, (got - want).abs().max())
    assert not torch.allclose(results[0], results[1], atol=1e-2)  # and not each other's


def test_a_request_joins_between_steps_and_leaves_when_done(sd3) -> None:
    first_steps_done = threading.Event()

    def on_step(done: int, total: int) -> None:
        if done == 2:
            first_steps_done.set()

    engine = _engine(sd3)
    try:
        long = engine.submit(_loop(sd3, 1, num_inference_steps=12, on_step=on_step))
        assert first_steps_done.wait(60)
        short = engine.submit(_loop(sd3, 2, num_inference_steps=3))
        short_latents = short.result(timeout=120)
        long_latents = long.result(timeout=120)
    finally:
        engine.close()
    # Steps 1-2 (and after the short one left) alone, three steps together.
    assert engine.batch_sizes[2] == 3 and engine.batch_sizes[1] >= 9, engine.batch_sizes
    assert torch.allclose(short_latents, _alone(sd3, 2, num_inference_steps=3), atol=ATOL)
    assert torch.allclose(long_latents, _alone(sd3, 1, num_inference_steps=12), atol=ATOL)


def test_different_sizes_never_share_a_call_and_stay_exact(sd3) -> None:
    engine = _engine(sd3)
    try:
        a = engine.submit(_loop(sd3, 1, height=64, width=64))
        b = engine.submit(_loop(sd3, 2, height=64, width=96))
        got_a, got_b = a.result(timeout=120), b.result(timeout=120)
    finally:
        engine.close()
    assert set(engine.batch_sizes) == {1}
    assert torch.equal(got_a, _alone(sd3, 1, height=64, width=64))  # alone = exactly the pipeline's loop
    assert torch.equal(got_b, _alone(sd3, 2, height=64, width=96))


def test_cancelling_one_request_leaves_the_others_untouched(sd3) -> None:
    steps: list[int] = []
    engine = _engine(sd3)
    try:
        keep = engine.submit(_loop(sd3, 1, num_inference_steps=6))
        stop_after_two = {"on_step": lambda done, total: steps.append(done), "should_stop": lambda: len(steps) >= 2}
        cancel = engine.submit(_loop(sd3, 2, num_inference_steps=6, **stop_after_two))
        with pytest.raises(DenoiseCancelled):
            cancel.result(timeout=120)
        kept = keep.result(timeout=120)
    finally:
        engine.close()
    assert steps == [1, 2]
    assert torch.allclose(kept, _alone(sd3, 1, num_inference_steps=6), atol=ATOL)


def test_lora_sets_are_never_mixed(settings: Settings) -> None:
    """A request with LoRA A, one with none and one with A at another scale: three groups, each
    request alone in its calls, so each equals its own solo run exactly."""
    bundle = load_denoiser("sd3-transformer", settings)
    cache = LoraCache(bundle.transformer, max_bytes=1 << 30)

    def path_of(name: str):
        return lora_path(name, settings)

    sets = [[("sd3-lora-a", 1.0)], [], [("sd3-lora-a", 0.5)]]
    want = []
    for seed, loras in enumerate(sets):
        with cache.activate(loras, path_of):
            want.append(_alone(bundle, seed))
    engine = _engine(bundle, activate=lambda loras: cache.activate_now(loras, path_of))
    try:
        futures = [engine.submit(_loop(bundle, seed), loras) for seed, loras in enumerate(sets)]
        got = [f.result(timeout=120) for f in futures]
    finally:
        engine.close()
    assert set(engine.batch_sizes) == {1}
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    assert not torch.equal(got[0], got[2])  # the scale mattered


def test_controlnet_requests_batch_together(settings: Settings, sd3) -> None:
    cn = load_controlnet("sd3-controlnet", settings)
    vae = load_vae("sd3-vae", settings)
    pixels = torch.randint(0, 255, (64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def control(seed: int) -> ControlSpec:
        latents = encode_control_image(
            vae, pixels, VaeEncodeParams(family="sd3", height=64, width=64, seed=seed, guidance_scale=4.0)
        )
        return ControlSpec(
            control_latents=latents,
            conditioning_scale=0.8,
            residuals=lambda c, v, p: controlnet_residuals(cn, c, v, p),
        )

    engine = _engine(sd3)
    try:
        futures = [engine.submit(_loop(sd3, seed, control=control(seed))) for seed in (1, 2)]
        got = [f.result(timeout=120) for f in futures]
    finally:
        engine.close()
    assert engine.batch_sizes[2] >= 1, engine.batch_sizes
    for seed, g in zip((1, 2), got, strict=True):
        assert torch.allclose(g, _alone(sd3, seed, control=control(seed)), atol=ATOL)


def test_a_failing_loop_fails_only_its_request(sd3) -> None:
    engine = _engine(sd3)
    try:
        good = engine.submit(_loop(sd3, 1))
        bad_inputs = _inputs(sd3, 2)
        bad_inputs["clip_l_embeds"] = bad_inputs["clip_l_embeds"][:1]  # one row: no [prompt, negative] pair
        bad = engine.submit(denoise_loop(sd3, DenoiseInputs(bad_inputs, **_kw(2))))
        with pytest.raises(ValueError, match="2 rows"):
            bad.result(timeout=120)
        assert torch.allclose(good.result(timeout=120), _alone(sd3, 1), atol=ATOL)
    finally:
        engine.close()


def test_controlnet_waits_of_batched_requests_overlap(settings: Settings, sd3) -> None:
    """Each ControlNet request's loop waits on the adapters service for its residuals; in a batch
    those waits run side by side instead of one after the other."""
    cn = load_controlnet("sd3-controlnet", settings)
    vae = load_vae("sd3-vae", settings)
    pixels = torch.randint(0, 255, (64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    waiting, peak, lock = 0, 0, threading.Lock()

    def slow_remote(c, v, p):
        nonlocal waiting, peak
        with lock:
            waiting += 1
            peak = max(peak, waiting)
        threading.Event().wait(0.05)  # a round trip to the adapters service
        try:
            return controlnet_residuals(cn, c, v, p)
        finally:
            with lock:
                waiting -= 1

    def control(seed: int) -> ControlSpec:
        latents = encode_control_image(
            vae, pixels, VaeEncodeParams(family="sd3", height=64, width=64, seed=seed, guidance_scale=4.0)
        )
        return ControlSpec(control_latents=latents, conditioning_scale=1.0, residuals=slow_remote)

    engine = _engine(sd3)
    try:
        futures = [engine.submit(_loop(sd3, seed, control=control(seed))) for seed in (1, 2, 3)]
        got = [f.result(timeout=120) for f in futures]
    finally:
        engine.close()
    assert engine.batch_sizes[3] >= 1, engine.batch_sizes
    assert peak == 3
    for seed, g in zip((1, 2, 3), got, strict=True):
        want = _alone(sd3, seed, control=ControlSpec(control(seed).control_latents, 1.0, slow_remote))
        assert torch.allclose(g, want, atol=ATOL)
