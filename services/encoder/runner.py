"""Encoder service: CLIP-L, CLIP-G and T5 text encoders, each its own model id and subject."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.messages import StepKind, StepRequest
from shared.service import ServiceSpec, StepContext, param_bytes
from shared.settings import Settings
from shared.worker import BadStepInput


@dataclass
class EncoderRunner:
    model_id: str
    bundle: Any
    kinds: tuple[StepKind, ...] = (StepKind.ENCODE,)

    def run(self, step: StepRequest, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        from services.encoder.model import encode

        p = step.params
        prompt = p.get("prompt")
        negative = p.get("negative_prompt") or ""
        if not isinstance(prompt, str) or not isinstance(negative, str):
            raise BadStepInput("params 'prompt' and 'negative_prompt' must be strings")
        options = {k: p[k] for k in ("outputs", "max_sequence_length") if k in p}
        # Row 0 is the prompt, row 1 the negative prompt (the denoiser needs both for guidance);
        # guidance-distilled families (Flux) set `negative: false` and get the prompt row only.
        texts = [prompt, negative] if p.get("negative", True) else [prompt]
        try:
            return encode(self.bundle, texts, **options)
        except ValueError as exc:
            raise BadStepInput(str(exc)) from exc

    def warm_up(self) -> None:
        from services.encoder.model import encode

        encode(self.bundle, ["warm up", ""])

    def status(self) -> dict[str, Any]:
        return {"param_bytes": param_bytes(self.bundle.model)}


def load(model_id: str, settings: Settings) -> EncoderRunner:
    from shared.zoo import load_text_encoder

    return EncoderRunner(model_id=model_id, bundle=load_text_encoder(model_id, settings))


SPEC = ServiceSpec(
    name="encoder",
    default_models=["clip-l", "clip-g", "t5"],
    load=load,
    description="Text encoder service: hosts one or several of clip-l, clip-g, t5, each on its own subject.",
)
