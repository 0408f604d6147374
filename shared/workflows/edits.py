"""An edit's workflow (image-to-image, inpainting), derived from a text-to-image one by rule.

Why derived, and a graph like the others rather than a special path: an edit differs from its
workflow in one node and two edges, the same for every family. The family's VAE encodes the
request's image (and, inpainting, brings its mask to the latents' size) in an `image` node,
whose outputs the denoise node starts from: noised to `strength` (img2img), and blended back
outside the mask at every step (inpainting), as diffusers' img2img / inpaint pipelines do. The
rest (encoders, LoRAs, decode) is the base workflow's; planning, progress, cancellation and
admission are the same code as for any workflow.
"""

from __future__ import annotations

from functools import cache

from shared.messages import StepKind
from shared.workflows.catalogue import get_workflow
from shared.workflows.planner import validate
from shared.workflows.spec import REQUEST, NodeSpec, WorkflowSpec

IMAGE_NODE = "image"
EDIT_IMAGE = "image"  # the request tensor: uint8 (H, W, 3), the client's image as sent
EDIT_MASK = "mask"  # the request tensor: uint8 (H, W), 255 where the image is repainted
EDIT_FAMILIES = ("sd3", "sd35-large", "flux", "sd15", "sdxl")  # the families whose denoisers have edit loops


def edit_steps(num_inference_steps: int, strength: float, unet: bool) -> tuple[int, int]:
    """(first step, steps run) of an edit: the pipelines' `get_timesteps`. The flow-matching
    pipelines (sd3, flux) keep the fraction `num_inference_steps * strength` until the end, the
    UNet pipelines (sd15, sdxl) floor it first, so 3 steps at strength 0.6 run 2 and 1."""
    if unet:
        t_start = max(num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps), 0)
    else:
        t_start = int(max(num_inference_steps - min(num_inference_steps * strength, num_inference_steps), 0))
    return t_start, num_inference_steps - t_start


class EditError(ValueError):
    """A workflow that cannot edit: the message says which and what to use instead."""


def with_edit(base: WorkflowSpec, inpaint: bool) -> WorkflowSpec:
    """`base` editing the request's image: `<name>-img2img`, or `<name>-inpaint` with a mask."""
    if base.controlnets:
        raise EditError(f"workflow {base.name!r} is a ControlNet workflow; edits take text-to-image workflows")
    if base.family not in EDIT_FAMILIES:  # a family added without an edit loop
        raise EditError(
            f"the {base.family} family has no image edits yet; edit with a workflow of {', '.join(EDIT_FAMILIES)}"
        )
    denoise = base.node_of_kind(StepKind.DENOISE)
    decode = base.node_of_kind(StepKind.VAE_DECODE)
    image_inputs = {"pixels": f"{REQUEST}.{EDIT_IMAGE}"}
    denoise_inputs = {**denoise.inputs, "image_latents": f"{IMAGE_NODE}.latents"}
    if inpaint:
        image_inputs["mask"] = f"{REQUEST}.{EDIT_MASK}"
        denoise_inputs["mask"] = f"{IMAGE_NODE}.mask"
    image = NodeSpec(id=IMAGE_NODE, kind=StepKind.VAE_ENCODE, model=decode.model, inputs=image_inputs)
    new_denoise = denoise.model_copy(update={"inputs": denoise_inputs})
    nodes = [new_denoise if n.id == denoise.id else n for n in base.nodes]
    nodes.insert(nodes.index(new_denoise), image)
    mode = "inpaint" if inpaint else "img2img"
    what = "repaints the masked part of the request's image" if inpaint else "redraws the request's image"
    spec = base.model_copy(
        update={"name": f"{base.name}-{mode}", "description": f"{base.description}; {what}", "nodes": nodes},
        deep=True,
    )
    validate(spec)
    return spec


@cache
def edit_workflow(name: str, inpaint: bool) -> WorkflowSpec:
    """The edit workflow of catalogue workflow `name` (KeyError if unknown, EditError if it cannot edit)."""
    return with_edit(get_workflow(name), inpaint)
