"""Every workflow of the catalogue, through the REST API, equals diffusers' own pipeline for it
(`StableDiffusion3Pipeline`, `StableDiffusion3ControlNetPipeline`, `FluxPipeline`,
`FluxControlNetPipeline`, `StableDiffusionPipeline` for sd15, `StableDiffusionXLPipeline` for
sdxl, with the same LoRAs loaded) built from the same components, seed and parameters. Also:
requests with different LoRAs on one base, arriving together, each get their own workflow's image."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from shared.workflows.catalogue import catalogue
from tests.oracle import assert_images_match, pipeline_negative_prompt, png_to_array

PROMPT = "a lighthouse on a cliff, ink drawing"
SEED = 77
GUIDANCE = {"sd3": 5.0, "sd35-large": 4.5, "flux": 3.5, "sd15": 7.5, "sdxl": 5.0}


def control_image(width: int, height: int) -> Image.Image:
    """An edge map like a Canny detector's: white outlines of a circle and a box on black."""
    y, x = np.mgrid[0:height, 0:width]
    ring = np.abs(np.hypot(x - width / 2, y - height / 2) - min(width, height) / 3) < 1.5
    box = ((np.abs(x - width / 4) < 1) | (np.abs(y - height / 4) < 1)) & (x > width / 4) & (y > height / 4)
    edges = ((ring | box) * 255).astype(np.uint8)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def _b64png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def references(settings):
    """One reference pipeline per (family, ControlNet or not); LoRA cases build their own."""
    from baseline.pipelines import build_reference_pipeline

    cache: dict = {}

    def get(family: str, controlnet: bool, fresh: bool = False):
        if fresh:
            return build_reference_pipeline(settings, family=family, controlnet=controlnet)
        if (family, controlnet) not in cache:
            cache[family, controlnet] = build_reference_pipeline(settings, family=family, controlnet=controlnet)
        return cache[family, controlnet]

    return get


def reference_images(references, settings, workflow: str, body: dict, control: Image.Image | None) -> list:
    """What diffusers' pipeline for `workflow` draws for the same request."""
    from baseline.pipelines import load_reference_loras

    spec = catalogue()[workflow]
    loras = [(x["name"], x["scale"]) for x in body.get("loras", [])] or [(x.name, x.scale) for x in spec.default_loras]
    pipe = references(spec.family, control is not None, fresh=bool(spec.loras))
    if spec.loras:
        load_reference_loras(pipe, loras, settings)
    width, height = (int(v) for v in body["size"].split("x"))
    kwargs = {
        "prompt": body["prompt"],
        "height": height,
        "width": width,
        "num_inference_steps": body["num_inference_steps"],
        "guidance_scale": body["guidance_scale"],
        "generator": torch.Generator("cpu").manual_seed(body["seed"]),
        "num_images_per_prompt": body.get("n", 1),
    }
    if spec.family == "flux":
        kwargs["max_sequence_length"] = 512
    else:
        kwargs["negative_prompt"] = pipeline_negative_prompt(pipe, body.get("negative_prompt", ""))
    if control is not None:
        kwargs["control_image"] = control
        kwargs["controlnet_conditioning_scale"] = body["controlnet"].get("conditioning_scale", 1.0)
        # SD3ControlNetPipeline samples the control image's latents from the global RNG; the
        # mesh seeds that draw from the request seed, so the oracle seeds the global RNG alike.
        torch.manual_seed(body["seed"])
    return pipe(**kwargs).images


def _body(workflow: str, **extra) -> dict:
    family = catalogue()[workflow].family
    body = {
        "prompt": PROMPT,
        "size": "64x64",
        "num_inference_steps": 3,
        "guidance_scale": GUIDANCE[family],
        "seed": SEED,
        "workflow": workflow,
    }
    return {**body, **extra}


CASES = [
    ("sd3", {}),
    ("sd3-controlnet", {"controlnet": {"conditioning_scale": 0.8}}),
    ("sd3-lora", {"loras": [{"name": "sd3-lora-b", "scale": 0.7}]}),
    ("sd3-controlnet-lora", {"controlnet": {}}),
    ("sd35-large", {"negative_prompt": "blurry", "size": "96x64"}),
    ("sd35-large-controlnet", {"controlnet": {}, "n": 2}),
    ("sd35-large-lora", {}),
    ("sd35-large-controlnet-lora", {"controlnet": {}, "loras": [{"name": "sd35-large-lora-a", "scale": 0.5}]}),
    ("flux", {"size": "64x96"}),
    ("flux-controlnet", {"controlnet": {"conditioning_scale": 1.2}}),
    ("flux-lora", {"loras": [{"name": "flux-lora-a", "scale": 1.0}, {"name": "flux-lora-b", "scale": 0.5}]}),
    ("flux-controlnet-lora", {"controlnet": {}, "n": 2}),
    ("sd15", {"negative_prompt": "blurry", "size": "64x96"}),
    ("sdxl", {"size": "96x64", "n": 2}),  # empty negative prompt: zero negative embeddings
]


def test_the_cases_cover_the_whole_catalogue():
    assert sorted(w for w, _ in CASES) == sorted(catalogue())


@pytest.mark.parametrize(("workflow", "extra"), CASES, ids=[w for w, _ in CASES])
def test_workflow_image_equals_its_diffusers_pipeline(mesh, references, settings, workflow, extra):
    body = _body(workflow, **extra)
    control = None
    if "controlnet" in body:
        width, height = (int(v) for v in body["size"].split("x"))
        control = control_image(width, height)
        body["controlnet"] = {**body["controlnet"], "image": _b64png(control)}
    r = httpx.post(f"{mesh.url}/v1/images/generations", json=body, timeout=300)
    assert r.status_code == 200, r.text
    got = r.json()["data"]
    want = reference_images(references, settings, workflow, body, control)
    assert len(got) == len(want) == body.get("n", 1)
    for item, image in zip(got, want, strict=True):
        assert_images_match(png_to_array(item["b64_json"]), image)


def test_different_loras_on_one_base_arriving_together(mesh, references, settings):
    """One SD3 base, three requests at once: LoRA A, LoRA B, and none. Each must get the image
    its own workflow gives alone, so adapters are switched per request, never mixed."""
    bodies = [
        _body("sd3-lora", loras=[{"name": "sd3-lora-a", "scale": 1.0}]),
        _body("sd3-lora", loras=[{"name": "sd3-lora-b", "scale": 1.0}]),
        _body("sd3"),
        _body("sd3-lora", loras=[{"name": "sd3-lora-a", "scale": 1.0}, {"name": "sd3-lora-b", "scale": 0.5}]),
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: httpx.post(f"{mesh.url}/v1/images/generations", json=b, timeout=300), bodies))
    images = []
    for body, r in zip(bodies, answers, strict=True):
        assert r.status_code == 200, r.text
        [want] = reference_images(references, settings, body["workflow"], body, None)
        got = png_to_array(r.json()["data"][0]["b64_json"])
        assert_images_match(got, want)
        images.append(got)
    # and the LoRAs really change the picture
    assert not np.array_equal(images[0], images[1])
    assert not np.array_equal(images[0], images[2])
