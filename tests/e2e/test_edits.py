"""`POST /v1/images/edits` end to end, as a user of the official openai client sees it: the image
comes back at the asked size, an inpainting keeps the mask's opaque region and repaints its
transparent one, an image-to-image edit equals diffusers' `StableDiffusion3Img2ImgPipeline`,
and bad input is a 400 that says what was wrong.

The mesh is the e2e tests' sd3 one (tests/e2e/conftest.py: sd3_tcp_mesh; every tensor, the
edit's image and mask too, over the tcp transport).
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from lego.launcher import Mesh
from tests.oracle import assert_images_match, png_to_array
from tests.waiting import wait_for

PROMPT = "a lighthouse on a cliff"


@pytest.fixture(scope="module")
def sd3_mesh(sd3_tcp_mesh: Mesh) -> Mesh:
    return sd3_tcp_mesh


def picture(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    disc = np.hypot(x - width / 3, y - height / 2) < min(width, height) / 4
    return np.stack([x * 255 // width, y * 255 // height, np.where(disc, 230, 40)], axis=-1).astype(np.uint8)


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def right_half_transparent(width: int, height: int) -> bytes:
    """OpenAI's mask: opaque (kept) on the left half, transparent (repainted) on the right."""
    rgba = np.full((height, width, 4), 255, dtype=np.uint8)
    rgba[:, width // 2 :, 3] = 0
    return png(rgba)


IMAGE = png(picture(80, 64))  # not the output size: resized as the pipelines resize


def client(mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{mesh.url}/v1", api_key="unused-the-mesh-runs-without-keys", timeout=300)


def edit_with_openai(mesh: Mesh, prompt: str, mask: bytes | None, model: str = "sd3", **extra) -> np.ndarray:
    kwargs = {"mask": ("mask.png", mask, "image/png")} if mask is not None else {}
    result = client(mesh).images.edit(
        image=("image.png", IMAGE, "image/png"),
        prompt=prompt,
        model=model,
        size="64x64",
        extra_body={"num_inference_steps": 3, "seed": 11, "guidance_scale": 4.0} | extra,
        **kwargs,
    )
    assert result.data is not None and len(result.data) == 1
    return png_to_array(result.data[0].b64_json)


def test_openai_client_inpaints_as_diffusers_pipeline(sd3_mesh: Mesh, reference_pipeline) -> None:
    """OpenAI's mask (transparent: repaint) reaches the mesh as diffusers' (white: repaint): the
    image equals `StableDiffusion3InpaintPipeline`'s with the right half white. Its latents, that
    is, decoded as every SD3 pipeline but this one decodes them (it leaves out the VAE's shift
    factor; see tests/unit/test_edits_match_pipeline.py, which also shows the opaque half's
    latents are exactly the image's: the tiny VAE's GroupNorm and attention spread every latent
    over the whole picture, so in pixels the halves cannot be told apart)."""
    from types import SimpleNamespace

    from diffusers import StableDiffusion3InpaintPipeline

    from services.vae.model import decode

    got = edit_with_openai(sd3_mesh, PROMPT, right_half_transparent(80, 64), strength=0.8)
    assert got.shape == (64, 64, 3)
    white = np.zeros((64, 80), dtype=np.uint8)
    white[:, 40:] = 255
    pipe = StableDiffusion3InpaintPipeline(**reference_pipeline.components)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        latents = pipe(
            prompt=PROMPT,
            negative_prompt="",
            image=Image.open(io.BytesIO(IMAGE)),
            mask_image=Image.fromarray(white),
            strength=0.8,
            height=64,
            width=64,
            num_inference_steps=3,
            guidance_scale=4.0,
            generator=torch.Generator("cpu").manual_seed(11),
            output_type="latent",
        ).images
    want = decode(SimpleNamespace(vae=pipe.vae), latents).numpy()[0]
    assert_images_match(got, want)
    inverted = edit_with_openai(
        sd3_mesh, PROMPT, png(255 - np.asarray(Image.open(io.BytesIO(right_half_transparent(80, 64))))), strength=0.8
    )
    assert np.abs(inverted.astype(np.int16) - got).mean() > 1  # the mask's side matters


def test_openai_client_img2img_equals_diffusers_pipeline(sd3_mesh: Mesh, reference_pipeline) -> None:
    from diffusers import StableDiffusion3Img2ImgPipeline

    got = edit_with_openai(sd3_mesh, PROMPT, None, strength=0.7, negative_prompt="blurry")
    pipe = StableDiffusion3Img2ImgPipeline(**reference_pipeline.components)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = pipe(
            prompt=PROMPT,
            negative_prompt="blurry",
            image=Image.open(io.BytesIO(IMAGE)),
            strength=0.7,
            height=64,
            width=64,
            num_inference_steps=3,
            guidance_scale=4.0,
            generator=torch.Generator("cpu").manual_seed(11),
        ).images[0]
    assert_images_match(got, np.asarray(want))


def test_async_edit_reports_progress_and_its_images(sd3_mesh: Mesh) -> None:
    r = httpx.post(
        f"{sd3_mesh.url}/v1/images/edits",
        files={"image": ("image.png", IMAGE, "image/png")},
        data={"prompt": PROMPT, "wait": "false", "num_inference_steps": "4", "strength": "0.5", "seed": "3"},
        timeout=60,
    )
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["workflow"] == "sd3-img2img" and accepted["seed"] == 3
    with httpx.stream("GET", f"{sd3_mesh.url}{accepted['events_url']}", timeout=120) as events:
        kinds, progress = [], []
        for line in events.iter_lines():
            if line.startswith("event: "):
                kinds.append(line.removeprefix("event: "))
            if line.startswith("data: ") and kinds and kinds[-1] == "progress":
                progress.append(line)
            if kinds and kinds[-1] in ("result", "error"):
                break
    assert kinds[-1] == "result", kinds
    assert len(progress) == 2  # strength 0.5 of 4 steps: the last 2 of the schedule
    status = httpx.get(f"{sd3_mesh.url}{accepted['status_url']}", timeout=30).json()
    assert status["status"] == "succeeded" and len(status["data"]) == 1
    image = png_to_array(status["data"][0]["b64_json"])
    assert image.shape == (64, 80, 3)  # no size: the image's own (80x64, multiples of 16)


def _post(mesh: Mesh, files: dict, **data: str) -> httpx.Response:
    return httpx.post(f"{mesh.url}/v1/images/edits", files=files, data={"prompt": PROMPT} | data, timeout=60)


@pytest.mark.parametrize(
    ("files", "data", "says"),
    [
        ({"image": ("i.png", b"not an image", "image/png")}, {}, "image: not a readable"),
        ({"image": ("i.png", IMAGE, "image/png"), "mask": ("m.png", right_half_transparent(64, 64), "image/png")},
         {}, "send a mask of the image's size"),
        ({"image": ("i.png", IMAGE, "image/png"), "mask": ("m.png", png(picture(80, 64)), "image/png")},
         {}, "no alpha channel"),
        ({"image": ("i.png", IMAGE, "image/png")}, {"strength": "1.5"}, "strength"),
        ({"image": ("i.png", IMAGE, "image/png")}, {"strength": "0"}, "strength"),
        ({"image": ("i.png", IMAGE, "image/png")}, {"colour": "red"}, "colour: unknown field"),
        ({"image": ("i.png", IMAGE, "image/png")}, {"workflow": "sd3-controlnet"}, "ControlNet"),
        ({"image": ("i.png", IMAGE, "image/png")}, {"size": "65x64"}, "size"),
        ({}, {}, "image: missing"),
    ],
    ids=["unreadable", "mask-size", "mask-opaque", "strength-high", "strength-zero", "unknown", "controlnet",
         "size", "no-image"],
)  # fmt: skip
def test_bad_edits_are_400_with_the_reason(sd3_mesh: Mesh, files: dict, data: dict, says: str) -> None:
    r = _post(sd3_mesh, files, **data)
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]["message"]


def test_unknown_workflow_is_404(sd3_mesh: Mesh) -> None:
    r = _post(sd3_mesh, {"image": ("i.png", IMAGE, "image/png")}, workflow="sd4")
    assert r.status_code == 404 and "known:" in r.json()["error"]["message"]


def test_openai_client_sees_the_400(sd3_mesh: Mesh) -> None:
    with pytest.raises(openai.BadRequestError, match="mask"):
        client(sd3_mesh).images.edit(
            image=("image.png", IMAGE, "image/png"),
            mask=("mask.png", right_half_transparent(32, 32), "image/png"),
            prompt=PROMPT,
        )


def test_edits_take_the_openai_fields_as_generations_do(sd3_mesh: Mesh) -> None:
    """The SDK's fields mean on edits what they mean on generations: a link to the image, a
    JPEG at output_compression, and a value these models cannot honour named in a 400."""
    quick = {"num_inference_steps": 2, "seed": 11}
    edits = client(sd3_mesh).images
    linked = edits.edit(
        image=("image.png", IMAGE, "image/png"),
        prompt=PROMPT,
        size="64x64",
        response_format="url",
        output_format="jpeg",
        output_compression=80,
        extra_body=quick,
    )
    assert linked.data is not None and linked.data[0].url is not None
    got = Image.open(io.BytesIO(httpx.get(linked.data[0].url, timeout=30).content))
    assert (got.format, got.size) == ("JPEG", (64, 64))
    with pytest.raises(openai.BadRequestError, match="background"):
        edits.edit(image=("image.png", IMAGE, "image/png"), prompt=PROMPT, background="transparent", extra_body=quick)
    r = _post(sd3_mesh, {"image": ("i.png", IMAGE, "image/png"), "markup": ("m.png", IMAGE, "image/png")})
    assert r.status_code == 400 and "markup" in r.json()["error"]["message"]


def test_edit_docs_state_the_form(sd3_mesh: Mesh) -> None:
    doc = httpx.get(f"{sd3_mesh.url}/openapi.json", timeout=30).json()
    body = doc["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "mask", "prompt", "strength", "size", "seed", "loras"} <= set(body["properties"])
    assert base64  # the images above come back as b64_json


def test_cancelling_an_edit_stops_it(sd3_mesh: Mesh) -> None:
    r = _post(
        sd3_mesh,
        {"image": ("i.png", IMAGE, "image/png"), "mask": ("m.png", right_half_transparent(80, 64), "image/png")},
        wait="false",
        num_inference_steps="100",
        size="512x512",  # with n=4, long enough to cancel midway (as the generations' cancel test)
        n="4",
    )
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["workflow"] == "sd3-inpaint"
    with httpx.stream("GET", f"{sd3_mesh.url}{accepted['events_url']}", timeout=120) as events:
        for line in events.iter_lines():
            if line == "event: progress":
                break
    assert httpx.delete(f"{sd3_mesh.url}{accepted['status_url']}", timeout=30).status_code == 200
    final = wait_for(
        "the cancelled edit to end",
        lambda: (
            (s := httpx.get(f"{sd3_mesh.url}{accepted['status_url']}", timeout=30).json())["status"] != "running" and s
        ),
        timeout_s=60,
    )
    assert final["status"] == "cancelled" and final["step"] < final["total_steps"] == 100


# Every other family, and a LoRA workflow, through the openai client on the whole-catalogue mesh
# (the e2e tests' `mesh`), against its diffusers pipeline within the oracle's bounds.
FAMILY_EDITS = [
    ("flux", True, "FluxInpaintPipeline", None),
    ("sd35-large-lora", False, "StableDiffusion3Img2ImgPipeline", [("sd35-large-lora-b", 0.7)]),
    ("flux-lora", False, "FluxImg2ImgPipeline", None),  # its default LoRA
    ("sd15", True, "StableDiffusionInpaintPipeline", None),
    ("sdxl", False, "StableDiffusionXLImg2ImgPipeline", None),
]


@pytest.mark.parametrize(("workflow", "inpaint", "pipeline", "loras"), FAMILY_EDITS, ids=[f[0] for f in FAMILY_EDITS])
def test_every_family_edits_as_its_pipeline(
    mesh: Mesh, settings, workflow: str, inpaint: bool, pipeline: str, loras
) -> None:
    import diffusers

    from baseline.pipelines import build_reference_pipeline, load_reference_loras
    from shared.workflows.catalogue import get_workflow
    from tests.oracle import pipeline_negative_prompt

    spec = get_workflow(workflow)
    image = picture(64, 64)  # of the output size: the UNet img2img pipelines take no size
    mask = np.zeros((64, 64, 4), dtype=np.uint8) + 255
    mask[:, 32:, 3] = 0
    extra: dict = {"strength": 0.75, "num_inference_steps": 4, "seed": 5, "guidance_scale": 3.0}
    if loras:  # as the SDK sends a list: loras[][name], loras[][scale]
        extra["loras"] = [{"name": name, "scale": scale} for name, scale in loras]
    form = {"mask": ("m.png", png(mask), "image/png")} if inpaint else {}
    result = client(mesh).images.edit(
        image=("i.png", png(image), "image/png"), prompt=PROMPT, model=workflow, extra_body=extra, **form
    )
    assert result.data is not None
    got = png_to_array(result.data[0].b64_json)
    assert got.shape == (64, 64, 3)

    base = build_reference_pipeline(settings, family=spec.family)
    if spec.loras:  # a -lora workflow: the request's LoRAs, or its default one
        load_reference_loras(base, loras or [(lora.name, lora.scale) for lora in spec.default_loras], settings)
    pipe = getattr(diffusers, pipeline).from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    args = {
        "prompt": PROMPT,
        "image": Image.fromarray(image),
        "strength": 0.75,
        "num_inference_steps": 4,
        "guidance_scale": 3.0,
        "generator": torch.Generator("cpu").manual_seed(5),
    }
    if spec.family == "flux":
        args["max_sequence_length"] = 512
    else:
        args["negative_prompt"] = pipeline_negative_prompt(pipe, "")
    if inpaint or spec.family not in ("sd15", "sdxl"):  # the UNet img2img pipelines take no size
        args |= {"height": 64, "width": 64}
    if inpaint:
        white = np.zeros((64, 64), dtype=np.uint8)
        white[:, 32:] = 255
        args["mask_image"] = Image.fromarray(white)
    with torch.no_grad():
        want = np.asarray(pipe(**args).images[0])
    assert_images_match(got, want)
