"""A workflow is data: a DAG of model-execution nodes, read from a JSON spec.

The spec stays plain; the rules (cycles, dangling inputs, which node is ready) live in
`planner.py`.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from shared.messages import StepKind


class NodeSpec(BaseModel):
    """One model call. `inputs` maps an input name to `"<node>.<output>"`; `params` names the
    request fields the node receives."""

    id: str
    kind: StepKind
    model: str
    params: list[str] = Field(default_factory=list)
    inputs: dict[str, str] = Field(default_factory=dict)


class WorkflowSpec(BaseModel):
    name: str
    description: str = ""
    family: str = ""
    nodes: list[NodeSpec]
    output: str  # "<node>.<output>" holding the images

    def node(self, node_id: str) -> NodeSpec:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(f"workflow {self.name!r} has no node {node_id!r}")

    def models(self) -> list[tuple[StepKind, str]]:
        """The (kind, model) pairs this workflow needs, in node order, without repeats."""
        seen: dict[tuple[StepKind, str], None] = {}
        for n in self.nodes:
            seen[(n.kind, n.model)] = None
        return list(seen)
