"""The UNet workflows (sd15, sdxl) through the REST API: listed with their models, validated,
and their images equal diffusers' `StableDiffusionPipeline` / `StableDiffusionXLPipeline` built
from the same directories, with and without classifier-free guidance, with a negative prompt and
with an empty one (SDXL: zero negative embeddings).

They run on the session's whole-catalogue mesh, which serves both with the same processes a mesh
for them alone would run (one per denoiser; the shared encoder and VAE services host their
models beside the others'): a mesh of their own cost the suite half a minute to start. A mesh
limited to some workflows is started by the sd3-only and ControlNet meshes of other tests."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from lego.launcher import Mesh
from lego.units import plan_units
from tests.oracle import assert_images_match, png_to_array, reference_images

PROMPT = "a lighthouse on a cliff, ink drawing"
MODELS = {
    "sd15": ["sd15-clip", "sd15-unet", "sd15-vae"],
    "sdxl": ["clip-l", "clip-g", "sdxl-unet", "sdxl-vae"],  # SD3's CLIP-L and CLIP-G, shared
}


@pytest.fixture(scope="module")
def unet_mesh(mesh: Mesh) -> Mesh:
    """The session's mesh: it serves sd15 and sdxl with the rest of the catalogue."""
    return mesh


@pytest.fixture(scope="module")
def pipelines(settings) -> dict:
    from baseline.pipelines import build_reference_pipeline

    return {family: build_reference_pipeline(settings, family=family) for family in MODELS}


def test_unet_workflows_are_listed_with_their_models_and_a_mesh_for_them_runs_only_theirs(unet_mesh: Mesh) -> None:
    listed = {w["name"]: w for w in httpx.get(f"{unet_mesh.url}/v1/workflows", timeout=10).json()["workflows"]}
    for name, models in MODELS.items():
        assert listed[name]["models"] == models and listed[name]["family"] == name
        assert listed[name]["controlnets"] == [] and listed[name]["loras"] == []
        assert not any(w.startswith(f"{name}-") for w in listed)  # no variants
        assert httpx.get(f"{unet_mesh.url}/readyz", params={"workflow": name}, timeout=10).status_code == 200
    assert {u.name: u.models for u in plan_units(list(MODELS))} == {
        "encoder": ("clip-l", "clip-g", "sd15-clip"),
        "sd15-unet": ("sd15-unet",),
        "sdxl-unet": ("sdxl-unet",),
        "vae": ("sd15-vae", "sdxl-vae"),
    }


@pytest.mark.parametrize(
    ("workflow", "size", "steps", "guidance", "n", "negative"),
    [
        ("sd15", "64x64", 4, 7.5, 1, "blurry, low quality"),
        ("sd15", "72x64", 3, 1.0, 2, ""),  # guidance 1: no CFG; 72: a multiple of 8, as its pipeline takes
        ("sdxl", "64x64", 4, 5.0, 1, "blurry, low quality"),
        ("sdxl", "96x64", 3, 7.5, 2, ""),  # zero negative embeddings (force_zeros_for_empty_prompt)
        ("sdxl", "64x88", 2, 1.0, 1, "fog"),  # guidance 1: no CFG; 88: a multiple of 8, not of 16
    ],
)
def test_image_equals_the_diffusers_pipeline(
    unet_mesh: Mesh, pipelines: dict, workflow: str, size: str, steps: int, guidance: float, n: int, negative: str
) -> None:
    seed = 4321
    body = {
        "workflow": workflow,
        "prompt": PROMPT,
        "negative_prompt": negative,
        "size": size,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "seed": seed,
        "n": n,
    }
    r = httpx.post(f"{unet_mesh.url}/v1/images/generations", json=body, timeout=300)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["workflow"] == workflow and got["seed"] == seed and len(got["data"]) == n
    width, height = (int(v) for v in size.split("x"))
    want = reference_images(
        pipelines[workflow],
        prompt=PROMPT,
        negative_prompt=negative,
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        seed=seed,
        n=n,
    )
    for item, image in zip(got["data"], want, strict=True):
        pixels = png_to_array(item["b64_json"])
        assert pixels.shape == (height, width, 3)
        assert_images_match(pixels, image)
        assert np.array_equal(pixels, np.asarray(image.convert("RGB"))), "no longer bit-identical to the pipeline"


@pytest.mark.parametrize("workflow", list(MODELS))
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"controlnet": {"image": "AAAA"}}, "takes no controlnet"),
        ({"loras": [{"name": "sd3-lora-a"}]}, "takes no loras"),
    ],
)
def test_controlnet_and_loras_are_refused(unet_mesh: Mesh, workflow: str, extra: dict, message: str) -> None:
    body = {"workflow": workflow, "prompt": PROMPT, "size": "64x64", "num_inference_steps": 2, **extra}
    r = httpx.post(f"{unet_mesh.url}/v1/images/generations", json=body, timeout=30)
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]["message"]
    assert f"the {workflow} family has no" in r.json()["error"]["message"]
