"""Graph rules for workflow specs: validation, readiness, and wiring of node inputs."""

from __future__ import annotations

from shared.messages import TensorRef
from shared.workflows.spec import REQUEST, NodeSpec, WorkflowSpec


class WorkflowError(ValueError):
    """A spec that cannot run: the message says which node and what is wrong."""


def split_ref(ref: str) -> tuple[str, str]:
    node, sep, output = ref.partition(".")
    if not sep or not node or not output:
        raise WorkflowError(f"input reference {ref!r} must look like '<node>.<output>'")
    return node, output


def validate(spec: WorkflowSpec) -> None:
    """Unique ids, inputs that name existing nodes, an existing output node, and no cycles."""
    ids = [n.id for n in spec.nodes]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise WorkflowError(f"workflow {spec.name!r}: duplicate node ids {sorted(dupes)}")
    known = set(ids) | {REQUEST}
    for n in spec.nodes:
        for name, ref in n.inputs.items():
            src, _ = split_ref(ref)
            if src not in known:
                raise WorkflowError(f"workflow {spec.name!r}: node {n.id!r} input {name!r} names unknown node {src!r}")
    out_node, _ = split_ref(spec.output)
    if out_node not in ids:
        raise WorkflowError(f"workflow {spec.name!r}: output names unknown node {out_node!r}")
    topological_order(spec)


def dependencies(node: NodeSpec) -> set[str]:
    """The nodes that must finish first (request tensors exist from the start)."""
    return {split_ref(ref)[0] for ref in node.inputs.values()} - {REQUEST}


def topological_order(spec: WorkflowSpec) -> list[str]:
    order: list[str] = []
    done: set[str] = set()
    pending = {n.id: dependencies(n) for n in spec.nodes}
    while pending:
        ready = sorted(i for i, deps in pending.items() if deps <= done)
        if not ready:
            raise WorkflowError(f"workflow {spec.name!r}: cycle among nodes {sorted(pending)}")
        for i in ready:
            order.append(i)
            done.add(i)
            del pending[i]
    return order


def ready_nodes(spec: WorkflowSpec, done: set[str], started: set[str]) -> list[NodeSpec]:
    """Nodes whose inputs are all produced and that were not started yet."""
    return [n for n in spec.nodes if n.id not in started and n.id not in done and dependencies(n) <= done]


def wire_inputs(node: NodeSpec, outputs: dict[str, dict[str, TensorRef]]) -> dict[str, TensorRef]:
    """The TensorRefs a node consumes, taken from the finished nodes' outputs (the request's own
    tensors under `outputs["request"]`)."""
    wired = {}
    for name, ref in node.inputs.items():
        src, out = split_ref(ref)
        try:
            wired[name] = outputs[src][out]
        except KeyError as exc:
            raise WorkflowError(f"node {node.id!r} needs {ref!r}, which node {src!r} did not produce") from exc
    return wired
