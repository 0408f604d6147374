"""The ControlNet and LoRA variants of a family's text-to-image workflow, derived by rule.

Why derived and not written out: `<family>-controlnet`, `-lora` and `-controlnet-lora` differ
from the base spec in the same two ways for every family, and twelve hand-kept JSON files
would drift apart. The rules:
- ControlNet: a `control` node (the family's VAE encodes the request's control image into
  latents) feeds the denoise node, which calls the family's ControlNet at every step;
- LoRA: the denoise node receives the request's `loras` and applies them to the shared base.
A family gets only the variants the zoo can serve: none with ControlNet unless the registry
names one for it, none with LoRA unless it lists LoRAs of its base (sd15 has neither).
"""

from __future__ import annotations

from shared.messages import StepKind
from shared.workflows.spec import REQUEST, LoraChoice, NodeSpec, WorkflowSpec
from shared.zoo.families import family
from shared.zoo.registry import loras_for

CONTROL_NODE = "control"
CONTROL_IMAGE = "control_image"  # the request tensor: uint8 (H, W, 3), the requested size


def with_controlnet(base: WorkflowSpec) -> WorkflowSpec:
    controlnet = family(base.family).controlnet
    denoise = base.node_of_kind(StepKind.DENOISE)
    decode = base.node_of_kind(StepKind.VAE_DECODE)
    control = NodeSpec(
        id=CONTROL_NODE,
        kind=StepKind.VAE_ENCODE,
        model=decode.model,
        inputs={"pixels": f"{REQUEST}.{CONTROL_IMAGE}"},
    )
    new_denoise = denoise.model_copy(
        update={
            "inputs": {**denoise.inputs, "control_latents": f"{CONTROL_NODE}.latents"},
        }
    )
    nodes = [new_denoise if n.id == denoise.id else n for n in base.nodes]
    nodes.insert(nodes.index(new_denoise), control)
    return base.model_copy(
        update={
            "name": f"{base.name}-controlnet",
            "description": f"{base.description}; guided at every step by a ControlNet on a control image",
            "nodes": nodes,
            "controlnets": [controlnet],
        },
        deep=True,
    )


def with_lora(base: WorkflowSpec) -> WorkflowSpec:
    denoise = base.node_of_kind(StepKind.DENOISE)
    loras = loras_for(denoise.model)
    return base.model_copy(
        update={
            "name": f"{base.name}-lora",
            "description": f"{base.description}; with the request's LoRAs applied to the shared base model",
            "loras": loras,
            "default_loras": [LoraChoice(name=loras[0], scale=1.0)],
        },
        deep=True,
    )


def variants(base: WorkflowSpec) -> list[WorkflowSpec]:
    """The base workflow and the variants its family has models for, in catalogue order."""
    controlnet = family(base.family).controlnet is not None
    lora = bool(loras_for(base.node_of_kind(StepKind.DENOISE).model))
    out = [base]
    if controlnet:
        out.append(with_controlnet(base))
    if lora:
        out.append(with_lora(base))
    if controlnet and lora:
        out.append(with_lora(with_controlnet(base)))
    return out
