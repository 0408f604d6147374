"""Encoder service: CLIP-L, CLIP-G and T5 text encoders, each its own model id and subject."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.messages import StepKind, StepRequest
from shared.service import ProgressFn, ServiceSpec
from shared.settings import Settings
from shared.worker import BadStepInput


@dataclass
class EncoderRunner:
    model_id: str
    bundle: Any
    kind: StepKind = StepKind.ENCODE

    def run(self, step: StepRequest, inputs: dict[str, Any], progress: ProgressFn) -> dict[str, Any]:
        from services.encoder.model import encode

        prompt = step.params.get("prompt")
        negative = step.params.get("negative_prompt") or ""
        if not isinstance(prompt, str) or not isinstance(negative, str):
            raise BadStepInput("params 'prompt' and 'negative_prompt' must be strings")
        # Row 0 is the prompt, row 1 the negative prompt: the denoiser needs both for guidance.
        return encode(self.bundle, [prompt, negative])

    def warm_up(self) -> None:
        from services.encoder.model import encode

        encode(self.bundle, ["warm up", ""])


def load(model_id: str, settings: Settings) -> EncoderRunner:
    from shared.zoo import load_text_encoder

    return EncoderRunner(model_id=model_id, bundle=load_text_encoder(model_id, settings))


SPEC = ServiceSpec(
    name="encoder",
    default_models=["clip-l", "clip-g", "t5"],
    load=load,
    description="Text encoder service: hosts one or several of clip-l, clip-g, t5, each on its own subject.",
)
