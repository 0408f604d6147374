"""Encoder service: CLIP-L, CLIP-G, T5 (and SD1.5's CLIP) text encoders, each its own model id and subject.

Texts of steps that queue up for one model are encoded in one call when batching is on
(`LEGO_ENCODE_MAX_BATCH`, 16 on a GPU, off on the CPU); a step alone is encoded text by text,
as the pipelines do, so its embeddings are theirs bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from shared.coalescing_runner import CoalescingRunner
from shared.messages import EncodeParams, StepKind, StepRequest
from shared.service import ServiceSpec, StepContext, param_bytes
from shared.worker import BadStepInput
from shared.zoo import load_text_encoder

Texts = tuple[list[str], dict[str, Any]]  # a step's texts (prompt, maybe negative) and its encode options


@dataclass
class EncoderRunner(CoalescingRunner[Texts, dict[str, Any]]):
    # With a max batch > 1 (`LEGO_ENCODE_MAX_BATCH`; 16 on a GPU): the texts of steps that
    # queue up are encoded in one call (`shared.coalescing_runner`).
    kinds: tuple[StepKind, ...] = (StepKind.ENCODE,)

    def run(self, step: StepRequest, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return self.run_one(self._texts(step))

    def run_many(self, items: list[Texts]) -> list[dict[str, Any]]:
        """Encode several steps' texts (same options) in one call; one step alone as the pipeline would."""
        import torch

        from services.encoder.model import encode

        options = items[0][1]
        texts = [text for item_texts, _ in items for text in item_texts]
        try:
            out = encode(self.bundle, texts, together=len(items) > 1, **options)
        except ValueError as exc:
            raise BadStepInput(str(exc)) from exc
        if len(items) == 1:
            return [out]
        sizes = [len(item_texts) for item_texts, _ in items]
        split = {name: torch.split(t, sizes) for name, t in out.items()}
        return [{name: parts[i] for name, parts in split.items()} for i in range(len(items))]

    def batch_key(self, item: Texts) -> str:
        """Steps wanting other outputs or lengths are encoded apart."""
        return json.dumps(item[1], sort_keys=True)

    def _texts(self, step: StepRequest) -> Texts:
        p = step.params
        if not isinstance(p, EncodeParams):
            raise BadStepInput(f"an encode step needs EncodeParams, got {type(p).__name__}")
        options = p.model_dump(include={"outputs", "max_sequence_length"}, exclude_none=True)
        # Row 0 is the prompt, row 1 the negative prompt (the denoiser needs both for guidance);
        # guidance-distilled families (Flux) set `negative: false` and get the prompt row only.
        texts = [p.prompt, p.negative_prompt or ""] if p.negative else [p.prompt]
        return texts, options

    def status(self) -> dict[str, Any]:
        return {"param_bytes": param_bytes(self.bundle.model)}

    def warm_up(self) -> None:
        from services.encoder.model import encode

        encode(self.bundle, ["warm up", ""])


SPEC = ServiceSpec(
    name="encoder",
    default_models=["clip-l", "clip-g", "t5"],
    load=EncoderRunner.loader(
        load_text_encoder, lambda settings: settings.encode_max_batch, gpu_default=16, kind=StepKind.ENCODE
    ),
    description="Text encoder service: hosts one or several of clip-l, clip-g, t5, sd15-clip, each on its own subject.",
)
