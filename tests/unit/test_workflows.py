"""Workflow specs are data; the planner's rules decide what runs when."""

from __future__ import annotations

import pytest

from shared.messages import StepKind, TensorRef
from shared.workflows.catalogue import catalogue, get_workflow
from shared.workflows.planner import WorkflowError, ready_nodes, topological_order, validate, wire_inputs
from shared.workflows.spec import NodeSpec, WorkflowSpec


def _spec(nodes: list[NodeSpec], output: str = "b.x") -> WorkflowSpec:
    return WorkflowSpec(name="t", nodes=nodes, output=output)


def test_sd3_runs_encoders_in_parallel_then_denoise_then_decode():
    sd3 = get_workflow("sd3")
    assert {n.id for n in ready_nodes(sd3, set(), set())} == {"clip_l", "clip_g", "t5"}
    assert ready_nodes(sd3, {"clip_l", "clip_g"}, {"clip_l", "clip_g", "t5"}) == []
    assert [n.id for n in ready_nodes(sd3, {"clip_l", "clip_g", "t5"}, {"clip_l", "clip_g", "t5"})] == ["denoise"]
    assert topological_order(sd3)[-2:] == ["denoise", "decode"]
    assert sd3.models()[3] == (StepKind.DENOISE, "sd3-transformer")


def test_unknown_workflow_names_the_known_ones():
    with pytest.raises(KeyError, match="sd3"):
        get_workflow("nope")
    assert "sd3" in catalogue()


def test_cycle_is_refused():
    spec = _spec(
        [
            NodeSpec(id="a", kind="encode", model="m", inputs={"i": "b.x"}),
            NodeSpec(id="b", kind="encode", model="m", inputs={"i": "a.x"}),
        ]
    )
    with pytest.raises(WorkflowError, match="cycle"):
        validate(spec)


@pytest.mark.parametrize(
    ("nodes", "output", "match"),
    [
        ([NodeSpec(id="a", kind="encode", model="m", inputs={"i": "ghost.x"})], "a.x", "unknown node 'ghost'"),
        ([NodeSpec(id="a", kind="encode", model="m")], "ghost.x", "output"),
        ([NodeSpec(id="a", kind="encode", model="m")] * 2, "a.x", "duplicate"),
        ([NodeSpec(id="a", kind="encode", model="m", inputs={"i": "nodot"})], "a.x", "<node>.<output>"),
    ],
)
def test_broken_specs_say_what_is_wrong(nodes, output, match):
    with pytest.raises(WorkflowError, match=match):
        validate(_spec(nodes, output))


def test_wire_inputs_takes_refs_from_finished_nodes():
    ref = TensorRef(key="k", dtype="float32", shape=[1], nbytes=4)
    node = NodeSpec(id="b", kind="denoise", model="m", inputs={"emb": "a.embeds"})
    assert wire_inputs(node, {"a": {"embeds": ref}}) == {"emb": ref}
    with pytest.raises(WorkflowError, match="did not produce"):
        wire_inputs(node, {"a": {}})
