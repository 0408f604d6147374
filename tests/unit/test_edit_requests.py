"""An edit as the gateway admits it: its workflow derived from a text-to-image one (an `image`
node the denoiser starts from), its step params, and the multipart form's checks (OpenAI's
mask convention turned into diffusers', the default size, 400s that name the field)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from services.gateway.edit_form import (
    decode_image,
    decode_mask,
    edit_size,
    generation_body,
    parse_fields,
    read_form,
)
from services.gateway.errors import APIError
from shared.messages import DenoiseParams, StepKind, VaeEncodeParams
from shared.workflows.catalogue import get_workflow
from shared.workflows.edits import EditError, edit_workflow
from shared.workflows.step_params import RequestParams, step_params


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("inpaint", [False, True])
def test_an_edit_workflow_starts_the_denoiser_from_the_encoded_image(inpaint: bool) -> None:
    spec = edit_workflow("sd3-lora", inpaint)
    assert spec.name == f"sd3-lora-{'inpaint' if inpaint else 'img2img'}"
    image = spec.node("image")
    assert image.kind == StepKind.VAE_ENCODE and image.model == "sd3-vae"
    assert image.inputs["pixels"] == "request.image" and ("mask" in image.inputs) == inpaint
    denoise = spec.node_of_kind(StepKind.DENOISE)
    assert denoise.inputs["image_latents"] == "image.latents"
    assert (denoise.inputs.get("mask") == "image.mask") == inpaint
    assert spec.loras == get_workflow("sd3-lora").loras  # the rest is the base workflow's
    request = RequestParams(
        prompt="a", height=64, width=96, num_inference_steps=4, guidance_scale=3.0, seed=5, strength=0.5
    )
    params = step_params(spec, request)
    assert isinstance(params["image"], VaeEncodeParams) and params["image"].purpose == "image"
    assert (params["image"].height, params["image"].width, params["image"].seed) == (64, 96, 5)
    assert isinstance(params["denoise"], DenoiseParams) and params["denoise"].strength == 0.5


def test_what_cannot_edit_is_refused_with_what_to_use() -> None:
    with pytest.raises(EditError, match="ControlNet"):
        edit_workflow("sd3-controlnet", False)
    assert edit_workflow("sd15", True).node("image").model == "sd15-vae"  # every family edits
    assert edit_workflow("sdxl", False).node("image").model == "sdxl-vae"
    request = RequestParams(prompt="a", height=64, width=64, num_inference_steps=4, guidance_scale=3.0, seed=5)
    with pytest.raises(ValueError, match="needs a strength"):
        step_params(edit_workflow("flux", False), request)
    with pytest.raises(ValueError, match="takes no strength"):
        step_params(get_workflow("sd3"), request.model_copy(update={"strength": 0.5}))
    # sd15/sdxl floor steps x strength (as their pipelines): 4 x 0.2 leaves no step there, 1 for sd3
    with pytest.raises(ValueError, match="leaves no denoising step"):
        step_params(edit_workflow("sdxl", False), request.model_copy(update={"strength": 0.2}))
    step_params(edit_workflow("sd3", False), request.model_copy(update={"strength": 0.2}))


def test_an_openai_mask_becomes_diffusers_repaint_where_transparent() -> None:
    rgba = np.full((16, 24, 4), 200, dtype=np.uint8)
    rgba[:, 12:, 3] = 0  # transparent: repaint
    rgba[0, 0, 3] = 1  # barely opaque is still kept
    mask = decode_mask(_png(rgba), (24, 16), 10_000).to_numpy()
    assert mask.shape == (16, 24) and mask.dtype == np.uint8
    assert (mask[:, 12:] == 255).all() and (mask[:, :12] == 0).all()


def test_bad_images_and_masks_are_400s_that_say_why() -> None:
    image = _png(np.zeros((16, 24, 3), dtype=np.uint8))
    assert decode_image(image, 10_000).shape == (16, 24, 3)
    cases = [
        (lambda: decode_image(b"GIF89a...", 10_000), 400, "image: not a readable"),
        (lambda: decode_image(image, 100), 413, "LEGO_MAX_IMAGE_PIXELS"),
        (lambda: decode_mask(image, (24, 16), 10_000), 400, "no alpha channel"),
        (lambda: decode_mask(_png(np.zeros((8, 8, 4), np.uint8)), (24, 16), 10_000), 400, "image's size"),
    ]
    for call, status, says in cases:
        with pytest.raises(APIError) as err:
            call()
        assert err.value.status == status and says in err.value.message


def test_form_fields_are_read_from_text_and_refused_by_name() -> None:
    fields = parse_fields({"prompt": "a cat", "n": "2", "wait": "false", "strength": "0.3", "seed": "7"})
    assert (fields.n, fields.wait, fields.strength, fields.seed) == (2, False, 0.3, 7)
    for bad, says in [
        ({"strength": "1.5"}, "strength"),
        ({"strength": "0"}, "strength"),
        ({"n": "two"}, "n:"),
        ({"colour": "red"}, "colour: unknown field"),
        ({"prompt": "  "}, "prompt is blank"),
    ]:
        with pytest.raises(APIError) as err:
            parse_fields({"prompt": "a cat"} | bad)
        assert err.value.status == 400 and says in err.value.message


def test_the_size_defaults_to_the_images_rounded_down_to_the_multiple() -> None:
    fields = parse_fields({"prompt": "a"})
    assert edit_size(fields, (100, 75), 16) == (96, 64)
    assert edit_size(fields, (100, 75), 8) == (96, 72)
    assert edit_size(parse_fields({"prompt": "a", "size": "auto"}), (128, 64), 16) == (128, 64)
    assert edit_size(parse_fields({"prompt": "a", "size": "256x128"}), (100, 75), 16) == (256, 128)
    with pytest.raises(APIError, match="pass size"):
        edit_size(fields, (40, 2000), 16)


def test_the_form_becomes_a_generation_body() -> None:
    fields = parse_fields({"prompt": "a", "loras": '[{"name": "sd3-lora-a", "scale": 0.5}]', "guidance_scale": "3"})
    body = generation_body(fields, 64, 96)
    assert body.size == "64x96" and body.guidance_scale == 3.0
    assert body.loras is not None and (body.loras[0].name, body.loras[0].scale) == ("sd3-lora-a", 0.5)
    with pytest.raises(APIError, match="loras: "):
        generation_body(parse_fields({"prompt": "a", "loras": "sd3-lora-a"}), 64, 64)


def test_loras_come_as_json_or_as_the_openai_sdk_sends_a_list() -> None:
    """extra_body={"loras": [...]} reaches the form as repeated loras[][name] / loras[][scale] fields."""
    import asyncio

    from starlette.datastructures import FormData, UploadFile

    image = UploadFile(io.BytesIO(b"png"), filename="i.png")
    sdk = FormData(
        [
            ("prompt", "a"),
            ("loras[][name]", "sd3-lora-a"),
            ("loras[][scale]", "0.5"),
            ("loras[][name]", "sd3-lora-b"),
            ("image", image),
        ]
    )
    sent = asyncio.run(read_form(sdk))
    assert sent.image == b"png" and sent.mask is None
    body = generation_body(sent.fields, 64, 64)
    assert [(lora.name, lora.scale) for lora in body.loras or []] == [("sd3-lora-a", 0.5), ("sd3-lora-b", 1.0)]
    twice = FormData([("prompt", "a"), ("image", image), ("image[]", image)])
    with pytest.raises(APIError, match="more than once"):
        asyncio.run(read_form(twice))
