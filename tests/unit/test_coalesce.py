"""Coalescing one-shot model calls (shared/coalesce.py), the runner base the encoder, VAE and
adapters share (shared/coalescing_runner.py), and their batched calls.

What a user would notice: under load, queued steps of one model share a call; steps that
cannot (other options) never do; one bad input fails only its own step; without batching a
step runs alone, as the pipeline runs it; and a step's result is its own (alone: bit for bit
the pipeline's; batched: up to float rounding).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import importlib
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import torch

from services.encoder.runner import EncoderRunner
from shared import metrics
from shared.coalesce import Coalescer, max_batch
from shared.coalescing_runner import CoalescingRunner
from shared.messages import StepKind, VaeEncodeParams
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


@dataclass
class _Upper(CoalescingRunner[str, str]):
    """A runner over a fake model: upper-cases strings, keyed by their first letter, and
    records each `run_many` call (its items and thread); a call may be held at `gate`."""

    calls: list[tuple[list[str], str]] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)
    gate: threading.Event = field(default_factory=threading.Event)

    def run_many(self, items: list[str]) -> list[str]:
        self.calls.append((items, threading.current_thread().name))
        self.started.set()
        assert self.gate.wait(10)
        if "bad" in items:
            raise ValueError(f"bad input in {items}")
        return [item.upper() for item in items]

    def batch_key(self, item: str) -> Hashable:
        return item[0]


def _eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_runner_with_max_batch_1_runs_each_item_alone_on_the_calling_thread() -> None:
    runner = _Upper(model_id="upper-alone", bundle=None)
    runner.gate.set()
    runner.start_coalescing(0, "cpu", gpu_default=8, kind=StepKind.ENCODE)  # the CPU default: no batching
    assert runner.concurrency == 1
    assert runner.run_one("abc") == "ABC"
    assert runner.run_one("abd") == "ABD"
    here = threading.current_thread().name
    assert runner.calls == [(["abc"], here), (["abd"], here)]
    with pytest.raises(ValueError, match="bad input"):  # the runner's own error, unchanged
        runner.run_one("bad")
    runner.close()  # nothing to stop
    assert runner.run_one("b") == "B"


def test_a_coalescing_runner_runs_queued_items_together_and_counts_its_batches() -> None:
    model_id, kind = "upper-batched", StepKind.VAE_DECODE
    labels = {"kind": str(kind), "model": model_id}
    runner = _Upper(model_id=model_id, bundle=None)
    runner.start_coalescing(0, "cuda", gpu_default=3, kind=kind)  # the GPU default
    assert runner.concurrency == 3
    try:
        with ThreadPoolExecutor(8) as steps:
            first = steps.submit(runner.run_one, "a0")
            assert runner.started.wait(10)  # a0 holds the model while the rest queue up
            rest = [steps.submit(runner.run_one, item) for item in ["a1", "b0", "a2", "a3", "a4"]]
            _eventually(lambda: len(runner._coalescer._queue) == len(rest))  # type: ignore[union-attr]
            runner.gate.set()
            assert first.result(10) == "A0"
            assert [f.result(10) for f in rest] == ["A1", "B0", "A2", "A3", "A4"]
    finally:
        runner.close()
    assert [items for items, _ in runner.calls] == [["a0"], ["a1", "a2", "a3"], ["b0"], ["a4"]]
    assert {thread for _, thread in runner.calls} == {f"coalesce-{model_id}"}
    assert metrics.REGISTRY.get_sample_value("lego_batch_size_count", labels) == 4
    assert metrics.REGISTRY.get_sample_value("lego_batch_size_sum", labels) == 1 + 3 + 1 + 1


def test_a_bad_item_in_a_coalesced_call_fails_only_its_own_step() -> None:
    runner = _Upper(model_id="upper-bad", bundle=None)
    runner.start_coalescing(4, "cpu", gpu_default=1, kind=StepKind.ENCODE)  # set: batches on the CPU too
    try:
        with ThreadPoolExecutor(4) as steps:
            first = steps.submit(runner.run_one, "b0")
            assert runner.started.wait(10)
            rest = [steps.submit(runner.run_one, item) for item in ["b1", "bad", "b2"]]
            _eventually(lambda: len(runner._coalescer._queue) == len(rest))  # type: ignore[union-attr]
            runner.gate.set()
            assert [first.result(10), rest[0].result(10), rest[2].result(10)] == ["B0", "B1", "B2"]
            with pytest.raises(ValueError, match="bad input"):
                rest[1].result(10)
    finally:
        runner.close()
    assert [items for items, _ in runner.calls] == [["b0"], ["b1", "bad", "b2"], ["b1"], ["bad"], ["b2"]]


def test_closing_a_coalescing_runner_stops_its_thread() -> None:
    runner = _Upper(model_id="upper-closed", bundle=None)
    runner.gate.set()
    runner.start_coalescing(2, "cpu", gpu_default=1, kind=StepKind.ENCODE)
    assert runner.run_one("x") == "X"
    coalescing = [t for t in threading.enumerate() if t.name == "coalesce-upper-closed"]
    assert len(coalescing) == 1 and coalescing[0].is_alive()
    runner.close()
    assert not coalescing[0].is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        runner.run_one("y")
    with pytest.raises(RuntimeError, match="already"):  # one coalescer a runner
        runner.start_coalescing(2, "cpu", gpu_default=1, kind=StepKind.ENCODE)


def test_a_runner_loader_builds_the_runner_from_settings() -> None:
    loaded: list[str] = []

    def load_bundle(model_id: str, settings: Settings) -> str:
        loaded.append(model_id)
        return f"weights of {model_id}"

    load = _Upper.loader(load_bundle, lambda settings: settings.vae_max_batch, gpu_default=5, kind=StepKind.ENCODE)
    on_gpu = load("upper-gpu", Settings.from_env({}, device="cuda"))
    on_cpu = load("upper-cpu", Settings.from_env({}, device="cpu"))
    set_on_cpu = load("upper-set", Settings.from_env({"LEGO_VAE_MAX_BATCH": "2"}, device="cpu"))
    try:
        assert isinstance(on_gpu, _Upper) and on_gpu.model_id == "upper-gpu"
        assert on_gpu.bundle == "weights of upper-gpu" and loaded == ["upper-gpu", "upper-cpu", "upper-set"]
        assert (on_gpu.concurrency, on_cpu.concurrency, set_on_cpu.concurrency) == (5, 1, 2)
    finally:
        for runner in (on_gpu, on_cpu, set_on_cpu):
            runner.close()


@pytest.mark.parametrize(
    "service,model_id,variable",
    [
        ("encoder", "clip-l", "LEGO_ENCODE_MAX_BATCH"),
        ("vae", "sd3-vae", "LEGO_VAE_MAX_BATCH"),
        ("adapters", "sd3-controlnet", "LEGO_CONTROLNET_MAX_BATCH"),
    ],
)
def test_each_service_reads_its_own_max_batch(settings: Settings, service: str, model_id: str, variable: str) -> None:
    spec = importlib.import_module(f"services.{service}.runner").SPEC
    env = {"LEGO_MODEL_CACHE_DIR": settings.model_cache_dir, "LEGO_DTYPE": settings.dtype, "LEGO_DEVICE": "cpu"}
    alone = spec.load(model_id, Settings.from_env({**env, variable: "0"}))  # the CPU's default: no batching
    batched = spec.load(model_id, Settings.from_env({**env, variable: "3"}))
    try:
        assert (alone.model_id, alone.concurrency, batched.concurrency) == (model_id, 1, 3)
    finally:
        alone.close()
        batched.close()


@pytest.mark.parametrize("model_id,options", [("t5", {"max_sequence_length": 256}), ("clip-l", {}), ("clip-g", {})])
def test_encoder_batches_texts_of_several_steps(settings: Settings, model_id: str, options: dict) -> None:
    runner = EncoderRunner(model_id=model_id, bundle=load_text_encoder(model_id, settings))
    items = [(["a red fox", ""], options), (["a blue whale", "blurry"], options), (["a tiny house"], options)]
    together = runner.run_many(items)
    for item, got in zip(items, together, strict=True):
        [alone] = runner.run_many([item])
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
    together = runner.run_many(batch)
    for latents, got in zip(batch, together, strict=True):
        [alone] = runner.run_many([latents])
        assert got.shape == alone.shape == (latents.shape[0], 64, 64, 3)
        assert (got.int() - alone.int()).abs().max() <= 1  # uint8 pixels: at most a rounding apart
    assert not torch.equal(together[0][0], together[2][0])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_adapters_run_queued_controlnet_steps_as_one_call(settings: Settings, family: str) -> None:
    """Three requests' ControlNet steps (as their denoisers send them) in one call: each gets
    its own residuals, up to float rounding."""
    from services.adapters.runner import ControlNetRunner
    from services.denoiser.denoise import denoise, warm_up_inputs
    from services.denoiser.loop import ControlSpec, DenoiseInputs
    from services.vae.model import encode_control_image
    from shared.zoo import load_controlnet, load_denoiser, load_vae

    model = f"{family}-controlnet"
    runner = ControlNetRunner(model_id=model, bundle=load_controlnet(model, settings))
    denoiser = load_denoiser(f"{family}-transformer", settings)
    vae = load_vae("flux-vae" if family == "flux" else "sd3-vae", settings)
    calls = []

    def capture(constant, varying, params):  # what the denoiser would send the adapters
        calls.append((constant, {k: v.clone() for k, v in varying.items()}, dict(params)))
        return runner.run_many([calls[-1]])[0]

    for seed in (1, 2, 3):
        gen = torch.Generator().manual_seed(seed)
        inputs = {k: torch.randn(v.shape, generator=gen) for k, v in warm_up_inputs(denoiser).items()}
        pixels = torch.randint(0, 255, (64, 64, 3), dtype=torch.uint8, generator=gen)
        latents = encode_control_image(
            vae, pixels, VaeEncodeParams(family=family, height=64, width=64, seed=seed, guidance_scale=4.0)
        )
        control = ControlSpec(control_latents=latents, conditioning_scale=0.7, residuals=capture)
        kw = {"height": 64, "width": 64, "num_inference_steps": 1, "guidance_scale": 4.0, "seed": seed}
        denoise(denoiser, DenoiseInputs(inputs, **kw, control=control))
    assert len({runner.batch_key(c) for c in calls}) == 1  # alike: they may run together
    together = runner.run_many(calls)
    for call, got in zip(calls, together, strict=True):
        [alone] = runner.run_many([call])
        assert got.keys() == alone.keys() and got
        for name in alone:
            assert torch.allclose(got[name], alone[name], atol=1e-5), (name, (got[name] - alone[name]).abs().max())
