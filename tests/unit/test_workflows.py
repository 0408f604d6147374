"""Workflow specs are data; the planner's rules decide what runs when."""

from __future__ import annotations

import pytest

from shared.messages import StepKind, TensorRef
from shared.workflows.catalogue import catalogue, get_workflow
from shared.workflows.planner import WorkflowError, ready_nodes, topological_order, validate, wire_inputs
from shared.workflows.spec import NodeSpec, WorkflowSpec
from shared.workflows.step_params import RequestParams, step_params


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


A_CAT_NOT_BLURRY = RequestParams(
    prompt="a cat", negative_prompt="blurry", height=64, width=64, num_inference_steps=2, guidance_scale=5.0, seed=1
)


def test_the_catalogue_is_twelve_transformer_workflows_and_the_unet_ones_alone():
    """sd3, sd35-large and flux each get their ControlNet/LoRA variants; sd15 and sdxl (no
    ControlNet, no LoRAs in the zoo) only their text-to-image workflows."""
    names = set(catalogue())
    families = ("sd3", "sd35-large", "flux")
    suffixes = ("", "-controlnet", "-lora", "-controlnet-lora")
    assert names == {f + s for f in families for s in suffixes} | {"sd15", "sdxl"}
    sd15 = get_workflow("sd15")
    assert sd15.family == "sd15" and not sd15.controlnets and not sd15.loras
    assert [m for _, m in sd15.models()] == ["sd15-clip", "sd15-unet", "sd15-vae"]
    assert topological_order(sd15) == ["clip", "denoise", "decode"]
    clip = step_params(sd15, A_CAT_NOT_BLURRY)["clip"]
    assert clip.outputs == ["last"] and clip.negative and clip.negative_prompt == "blurry"


def test_sdxl_reads_the_shared_clips_and_tells_the_unet_the_negative_prompt():
    """SDXL's encoders are SD3's clip-l (penultimate state only) and clip-g (with its pool); the
    denoise node gets the negative prompt's text, for `force_zeros_for_empty_prompt`."""
    sdxl = get_workflow("sdxl")
    assert sdxl.family == "sdxl" and not sdxl.controlnets and not sdxl.loras
    assert [m for _, m in sdxl.models()] == ["clip-l", "clip-g", "sdxl-unet", "sdxl-vae"]
    params = step_params(sdxl, A_CAT_NOT_BLURRY)
    assert params["clip_l"].outputs == ["embeds"]
    assert params["clip_g"].outputs == ["embeds", "pooled"]
    assert params["denoise"].negative_prompt == "blurry"


@pytest.mark.parametrize(
    "family,units",
    [
        ("sd15", {"encoder": ("sd15-clip",), "sd15-unet": ("sd15-unet",), "vae": ("sd15-vae",)}),
        ("sdxl", {"encoder": ("clip-l", "clip-g"), "sdxl-unet": ("sdxl-unet",), "vae": ("sdxl-vae",)}),
    ],
)
def test_the_launcher_starts_a_unet_familys_models_only_for_it(family, units):
    from lego.launcher import plan_units

    assert {u.name: u.models for u in plan_units([family])} == units
    everything = {u.name: u.models for u in plan_units()}
    unet, vae = f"{family}-unet", f"{family}-vae"
    assert vae in everything["vae"] and unet in everything
    assert all(not m.startswith(family) for m in everything["adapters"])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_unet_requests_refuse_controlnet_and_loras(family):
    from services.gateway.admission import admit
    from services.gateway.errors import APIError
    from services.gateway.schemas import ImageGenerationRequest

    workflow = get_workflow(family)
    ok = admit(ImageGenerationRequest(prompt="a cat", negative_prompt="blurry", workflow=family, seed=1), workflow)
    assert ok.steps["denoise"].loras == [] and ok.steps["denoise"].controlnet is None and not ok.tensors
    assert ok.request.negative_prompt == "blurry"
    refusals = [({"controlnet": {"image": "AAAA"}}, "controlnet"), ({"loras": [{"name": "sd3-lora-a"}]}, "lora")]
    for extra, what in refusals:
        body = ImageGenerationRequest(prompt="a cat", workflow=family, **extra)
        with pytest.raises(APIError) as refused:
            admit(body, workflow)
        assert refused.value.status == 422
        message = str(refused.value.message)
        assert f"takes no {what}" in message and f"{family} family has no" in message
