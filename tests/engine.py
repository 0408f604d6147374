"""Checks a family's loops against the batching engine: the same requests denoised alone and
all at once in one `BatchEngine` end alike (float rounding apart), and did share calls."""

from __future__ import annotations

from typing import Any

import torch

from services.denoiser.batching import BatchEngine
from services.denoiser.denoise import denoise, denoise_loop
from services.denoiser.loop import DenoiseInputs


def assert_batched_like_alone(bundle: Any, cases: list[tuple[dict[str, torch.Tensor], dict[str, Any]]]) -> None:
    """`cases`: (tensors, the other fields of `DenoiseInputs`) per request. Compare in float32: in bf16
    a batched call's kernels round differently from a solo call's (0.2 apart on an H100)."""
    alone = [denoise(bundle, DenoiseInputs(tensors, **kw)) for tensors, kw in cases]
    engine = BatchEngine(bundle.transformer, max_batch=len(cases), activate_loras=lambda chosen: None)
    try:
        futures = [engine.submit(denoise_loop(bundle, DenoiseInputs(tensors, **kw))) for tensors, kw in cases]
        together = [f.result(timeout=120) for f in futures]
    finally:
        engine.close()
    assert engine.batch_sizes[len(cases)] >= 1, f"the requests never shared a call: {dict(engine.batch_sizes)}"
    for got, want in zip(together, alone, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
