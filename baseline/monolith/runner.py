"""Monolith service: serves whole workflows, each with its own diffusers pipeline.

`python -m baseline.monolith --models sd3-lora` loads diffusers' own pipeline for that workflow
(StableDiffusion3Pipeline / ...ControlNetPipeline / FluxPipeline / FluxControlNetPipeline,
with the workflow's default LoRAs) from the same weights the mesh loads, and answers `pipeline`
steps on `lego.step.pipeline.<workflow>`: prompt and settings in, uint8 images out. Everything
the mesh does in five services happens here in one call, with every model of the workflow
resident in this process — which is the point of the comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from baseline.monolith.steps import PIPELINE, PipelineParams
from shared.messages import StepRequest
from shared.service import ServiceSpec, StepContext, param_bytes
from shared.settings import Settings
from shared.worker import BadStepInput
from shared.zoo.families import family as family_descriptor


@dataclass
class MonolithRunner:
    model_id: str  # the workflow's name: one replica, one workflow
    pipe: Any
    family: str
    kinds: tuple[str, ...] = (PIPELINE,)

    def run(self, step: StepRequest, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        import numpy as np
        import torch

        p = step.params
        if not isinstance(p, PipelineParams):
            raise BadStepInput(f"a pipeline step needs PipelineParams, got {type(p).__name__}")
        kwargs = self._call_kwargs(p)
        control = inputs.get("control_image")
        if control is not None:
            from PIL import Image

            kwargs["control_image"] = Image.fromarray(control.numpy().astype(np.uint8))
            kwargs["controlnet_conditioning_scale"] = p.conditioning_scale
            # SD3's ControlNet pipelines sample the control latents from torch's global RNG (Flux's
            # from the request's generator, untouched by this): seeded as the mesh seeds them.
            torch.manual_seed(p.seed)

        def on_step(pipe: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            # SD1.5's PNDM calls the UNet once more than num_inference_steps: never past the total.
            total = kwargs["num_inference_steps"]
            ctx.progress(min(i + 1, total), total)
            return kw

        images = self.pipe(**kwargs, callback_on_step_end=on_step).images
        return {"images": torch.from_numpy((np.clip(images, 0, 1) * 255).round().astype(np.uint8))}

    def _call_kwargs(self, p: PipelineParams) -> dict[str, Any]:
        """The pipeline call for a step's params, read the way the mesh reads a request."""
        import torch

        kwargs: dict[str, Any] = {
            "prompt": p.prompt,
            "height": p.height,
            "width": p.width,
            "num_inference_steps": p.num_inference_steps,
            "guidance_scale": p.guidance_scale,
            "generator": torch.Generator("cpu").manual_seed(p.seed),
            "num_images_per_prompt": p.n,
            "output_type": "np",
        }
        kwargs.update(self._t5_length())
        desc = family_descriptor(self.family)
        if desc.cfg:  # guidance-distilled families (Flux) take no negative prompt
            negative = p.negative_prompt
            # SDXL zeros the negative embeddings for None only (force_zeros_for_empty_prompt): the
            # request's empty negative prompt means that, in the mesh as here.
            kwargs["negative_prompt"] = (negative or None) if desc.reads_negative_text else negative
        return kwargs

    def _t5_length(self) -> dict[str, int]:
        """`max_sequence_length` as the mesh's T5 step uses it, for the families that read T5."""
        lengths = [e.max_sequence_length for e in family_descriptor(self.family).encoders if e.max_sequence_length]
        return {"max_sequence_length": lengths[0]} if lengths else {}

    def warm_up(self) -> None:
        self.pipe(
            prompt="warm up",
            height=64,
            width=64,
            num_inference_steps=1,
            output_type="np",
            **self._t5_length(),
            **({"control_image": _blank(64)} if hasattr(self.pipe, "controlnet") else {}),
        )

    def status(self) -> dict[str, Any]:
        modules = [m for m in self.pipe.components.values() if hasattr(m, "parameters")]
        return {
            "param_bytes": param_bytes(*modules),
            "loras": sorted(getattr(getattr(self.pipe, "transformer", None), "peft_config", None) or {}),
        }


def _blank(size: int) -> Any:
    from PIL import Image

    return Image.new("RGB", (size, size))


def load(workflow: str, settings: Settings) -> MonolithRunner:
    from baseline.pipelines import build_reference_pipeline, load_reference_loras
    from shared.workflows.catalogue import get_workflow

    spec = get_workflow(workflow)
    pipe = build_reference_pipeline(settings, family=spec.family, controlnet=bool(spec.controlnets))
    if spec.default_loras:
        load_reference_loras(pipe, [(x.name, x.scale) for x in spec.default_loras], settings)
    return MonolithRunner(model_id=workflow, pipe=pipe, family=spec.family)


SPEC = ServiceSpec(
    name="monolith",
    default_models=["sd3"],
    load=load,
    description="Monolithic baseline: each workflow as one diffusers pipeline in this process (--models names "
    "workflows).",
    module="baseline.monolith",
)
