"""A workflow is data: a DAG of model-execution nodes, read from a JSON spec.

The spec stays plain; the rules (cycles, dangling inputs, which node is ready) live in
`planner.py`. An input named `request.<name>` is a tensor the client sent with the request
(e.g. `request.control_image`), not the output of a node.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from shared.messages import LoraChoice, StepKind

REQUEST = "request"  # the pseudo-node whose outputs are the tensors a request carries


class NodeSpec(BaseModel):
    """One model call. `inputs` maps an input name to `"<node>.<output>"`. What the node is
    told besides its inputs (its typed step params) follows from the workflow's family:
    `shared.workflows.step_params`."""

    id: str
    kind: StepKind
    model: str
    inputs: dict[str, str] = Field(default_factory=dict)


class WorkflowSpec(BaseModel):
    name: str
    description: str = ""
    family: str = ""
    nodes: list[NodeSpec]
    output: str  # "<node>.<output>" holding the images
    controlnets: list[str] = Field(default_factory=list)  # accepted ControlNet ids; non-empty: needs one
    loras: list[str] = Field(default_factory=list)  # LoRA names a request may apply; empty: none
    default_loras: list[LoraChoice] = Field(default_factory=list)  # applied when a request names none

    def node(self, node_id: str) -> NodeSpec:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(f"workflow {self.name!r} has no node {node_id!r}")

    def node_of_kind(self, kind: StepKind) -> NodeSpec:
        found = [n for n in self.nodes if n.kind == kind]
        if len(found) != 1:
            raise KeyError(f"workflow {self.name!r} has {len(found)} {kind} nodes, expected one")
        return found[0]

    def models(self) -> list[tuple[StepKind, str]]:
        """The (kind, model) pairs this workflow needs, in node order, without repeats.

        ControlNets are listed too: the denoiser calls them at every step, so the workflow
        cannot run without a live replica of one."""
        seen: dict[tuple[StepKind, str], None] = {}
        for n in self.nodes:
            seen[(n.kind, n.model)] = None
        for cn in self.controlnets:
            seen[(StepKind.CONTROLNET, cn)] = None
        return list(seen)
