"""A request's step parameters, built and validated once, before any step is published.

Why here and from the family descriptor: what each node of a workflow receives (which encoder
outputs, T5's length, whether the negative prompt is encoded, the size multiple, whether the
loop reads the negative text) is family data (`shared.zoo.families`), and the services must
receive exactly what they run, typed (`shared.messages`). The gateway calls `step_params` at
admission, so a size the family cannot take is a 422 there, never a failed step later.
"""

from __future__ import annotations

from typing import Any

from shared.messages import (
    DenoiseParams,
    EncodeParams,
    StepKind,
    StepParams,
    VaeDecodeParams,
    VaeEncodeParams,
)
from shared.workflows.edits import EDIT_IMAGE, edit_steps
from shared.workflows.spec import REQUEST, NodeSpec, WorkflowSpec
from shared.zoo.families import EncoderUse, FamilyDescriptor, family


class RequestParams(DenoiseParams):
    """What one request asks for: its denoising, and the texts to encode for it. `controlnet`
    and `loras` are the request's choices; a node receives them only where its workflow
    takes them."""

    prompt: str
    negative_prompt: str = ""


def _encoder_use(desc: FamilyDescriptor, model_id: str) -> EncoderUse:
    for use in desc.encoders:
        if use.model_id == model_id:
            return use
    raise ValueError(f"the {desc.name} family reads no text encoder {model_id!r}")


def _encode(desc: FamilyDescriptor, node: NodeSpec, req: RequestParams) -> EncodeParams:
    use = _encoder_use(desc, node.model)
    return EncodeParams(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt if use.negative else None,
        negative=use.negative,
        outputs=list(use.outputs) if use.outputs else None,
        max_sequence_length=use.max_sequence_length,
    )


# The request fields a denoising loop seeds and steps by; a ControlNet's control image is
# encoded with the same ones (less the step count), so its latents fit the loop's.
_LOOP_FIELDS = ("height", "width", "num_inference_steps", "guidance_scale", "seed", "n", "strength")
_CONTROL_FIELDS = ("height", "width", "guidance_scale", "seed", "n")


def _fields(req: RequestParams, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(req, name) for name in names}


def _denoise(desc: FamilyDescriptor, workflow: WorkflowSpec, req: RequestParams) -> DenoiseParams:
    return DenoiseParams(
        **_fields(req, _LOOP_FIELDS),
        negative_prompt=req.negative_prompt if desc.reads_negative_text else None,
        controlnet=req.controlnet if workflow.controlnets else None,
        loras=list(req.loras) if workflow.loras else [],
    )


def _vae_encode(desc: FamilyDescriptor, node: NodeSpec, req: RequestParams) -> VaeEncodeParams:
    """A control image's encode, or an edit's image (the node that reads `request.image`)."""
    if node.inputs.get("pixels") == f"{REQUEST}.{EDIT_IMAGE}":
        if req.strength is None:
            raise ValueError("an edit needs a strength (0 < strength <= 1)")
        return VaeEncodeParams(family=desc.name, purpose="image", **_fields(req, _CONTROL_FIELDS))
    return VaeEncodeParams(family=desc.name, **_fields(req, _CONTROL_FIELDS))


def step_params(workflow: WorkflowSpec, req: RequestParams) -> dict[str, StepParams]:
    """Each node's typed params for `req` (node id -> params). Raises ValueError for a request
    the workflow's family cannot take (a size off its multiple, a negative prompt for a
    guidance-distilled family, a ControlNet workflow without a ControlNet)."""
    desc = family(workflow.family)
    desc.check_size(req.height, req.width)
    if req.negative_prompt and not desc.cfg:
        raise ValueError(f"workflow {workflow.name!r} takes no negative_prompt (its model is guidance-distilled)")
    if workflow.controlnets and req.controlnet is None:
        raise ValueError(f"workflow {workflow.name!r} needs a controlnet")
    edits = any(node.inputs.get("pixels") == f"{REQUEST}.{EDIT_IMAGE}" for node in workflow.nodes)
    if req.strength is not None and not edits:
        raise ValueError(f"workflow {workflow.name!r} edits no image, so it takes no strength")
    if req.strength is not None and edit_steps(req.num_inference_steps, req.strength, desc.is_unet)[1] < 1:
        raise ValueError(
            f"strength {req.strength} of {req.num_inference_steps} steps leaves no denoising step for "
            f"{workflow.name!r}: raise strength or num_inference_steps"
        )
    out: dict[str, StepParams] = {}
    for node in workflow.nodes:
        if node.kind == StepKind.ENCODE:
            out[node.id] = _encode(desc, node, req)
        elif node.kind == StepKind.DENOISE:
            out[node.id] = _denoise(desc, workflow, req)
        elif node.kind == StepKind.VAE_ENCODE:
            out[node.id] = _vae_encode(desc, node, req)
        elif node.kind == StepKind.VAE_DECODE:
            out[node.id] = VaeDecodeParams()
        else:
            raise ValueError(f"workflow {workflow.name!r}: node {node.id!r} of kind {node.kind} is not planned")
    return out
