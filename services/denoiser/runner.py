"""Denoiser service: the base model and its scheduler run a request's whole denoising loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.messages import StepKind, StepRequest
from shared.service import ProgressFn, ServiceSpec
from shared.settings import Settings
from shared.worker import BadStepInput

EMBEDDING_INPUTS = ("clip_l_embeds", "clip_l_pooled", "clip_g_embeds", "clip_g_pooled", "t5_embeds")
INT_PARAMS = ("height", "width", "num_inference_steps", "seed", "n")


@dataclass
class DenoiserRunner:
    model_id: str
    bundle: Any
    kind: StepKind = StepKind.DENOISE

    def run(self, step: StepRequest, inputs: dict[str, Any], progress: ProgressFn) -> dict[str, Any]:
        from services.denoiser.model import denoise

        missing = [name for name in EMBEDDING_INPUTS if name not in inputs]
        if missing:
            raise BadStepInput(f"denoise step lacks inputs {missing}")
        p = step.params
        bad = [k for k in INT_PARAMS if not isinstance(p.get(k), int) or isinstance(p.get(k), bool)]
        if bad or not isinstance(p.get("guidance_scale"), int | float):
            raise BadStepInput(f"denoise params must be integers {list(INT_PARAMS)} and a number guidance_scale")
        if p["height"] % 16 or p["width"] % 16:
            raise BadStepInput("height and width must be multiples of 16")
        try:
            latents = denoise(
                self.bundle,
                **{name: inputs[name] for name in EMBEDDING_INPUTS},
                height=p["height"],
                width=p["width"],
                num_inference_steps=p["num_inference_steps"],
                guidance_scale=float(p["guidance_scale"]),
                seed=p["seed"],
                num_images=p["n"],
                on_step=progress,
            )
        except ValueError as exc:  # shapes or sizes the model cannot take: no replica could
            raise BadStepInput(str(exc)) from exc
        return {"latents": latents}

    def warm_up(self) -> None:
        import torch

        from services.denoiser.model import denoise

        cfg = self.bundle.transformer.config
        clip = torch.zeros(2, 77, 1)
        denoise(
            self.bundle,
            clip_l_embeds=clip,
            clip_l_pooled=torch.zeros(2, cfg.pooled_projection_dim // 2),
            clip_g_embeds=clip,
            clip_g_pooled=torch.zeros(2, cfg.pooled_projection_dim - cfg.pooled_projection_dim // 2),
            t5_embeds=torch.zeros(2, 8, cfg.joint_attention_dim),
            height=64,
            width=64,
            num_inference_steps=2,
            guidance_scale=5.0,
            seed=0,
        )


def load(model_id: str, settings: Settings) -> DenoiserRunner:
    from shared.zoo import load_denoiser

    return DenoiserRunner(model_id=model_id, bundle=load_denoiser(model_id, settings))


SPEC = ServiceSpec(
    name="denoiser",
    default_models=["sd3-transformer"],
    load=load,
    description="Denoiser service: runs the whole denoising loop of a request on a shared base model.",
)
