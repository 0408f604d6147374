"""A model service whose models do nothing: every step is answered at once with tiny tensors.

It is a real replica (`shared.replica`: bus, presence heartbeats, tensor plane, metrics, the
step worker and handler), so a gateway sees the mesh it always sees and pays what it always
pays per request: planning, steps through JetStream, results, pulling the images over the
tensor plane, PNG encoding and HTTP. Only the models' compute is gone, so what is left is the
control plane's own cost. `bench/control_plane.py` runs one of these in place of each unit.

    python -m bench.noop_service --models clip-l,clip-g,t5
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.messages import StepKind, StepRequest
from shared.service import ServiceSpec, StepContext, main
from shared.settings import Settings
from shared.zoo.registry import MODELS

IMAGE_SIDE = 8  # the images a no-op VAE returns: (n, 8, 8, 3) uint8
KINDS_OF_ROLE: dict[str, tuple[StepKind, ...]] = {
    "text_encoder": (StepKind.ENCODE,),
    "denoiser": (StepKind.DENOISE,),
    "vae": (StepKind.VAE_DECODE, StepKind.VAE_ENCODE),
    "controlnet": (StepKind.CONTROLNET,),
}


@dataclass
class NoopRunner:
    """Tiny tensors of the names each kind's consumers read; no model behind them."""

    model_id: str
    kinds: tuple[StepKind | str, ...] = field(default_factory=tuple)

    def run(self, step: StepRequest, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        import torch

        n = getattr(step.params, "n", 1)
        if step.kind == StepKind.VAE_DECODE:
            return {"images": torch.zeros((n, IMAGE_SIDE, IMAGE_SIDE, 3), dtype=torch.uint8)}
        if step.kind == StepKind.DENOISE:  # a progress message an iteration, as the real loop sends
            total = getattr(step.params, "num_inference_steps", 1)
            for i in range(total):
                ctx.progress(i + 1, total)
        if step.kind == StepKind.ENCODE:
            return {"embeds": torch.zeros((2, 4, 8)), "pooled": torch.zeros((2, 8))}
        return {"latents": torch.zeros((n, 4, 2, 2))}

    def warm_up(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {"param_bytes": 0}


def load(model_id: str, settings: Settings) -> NoopRunner:
    return NoopRunner(model_id, KINDS_OF_ROLE[MODELS[model_id].role])


SPEC = ServiceSpec(
    name="noop",
    default_models=["clip-l", "clip-g", "t5", "sd3-transformer", "sd3-vae"],
    load=load,
    description="No-op model service (bench only): answers every step at once with tiny tensors.",
    module="bench.noop_service",
)

if __name__ == "__main__":
    main(SPEC)
