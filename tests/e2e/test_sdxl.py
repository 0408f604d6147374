"""The sdxl workflow through the REST API, on a mesh started for it alone (its four models: the
shared clip-l and clip-g, sdxl-unet, sdxl-vae): listed, validated, and its images equal diffusers'
`StableDiffusionXLPipeline` built from the same directories, with and without classifier-free
guidance, with a negative prompt and with an empty one (zero negative embeddings)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from lego.launcher import Mesh
from tests.conftest import running_mesh
from tests.oracle import assert_images_match, png_to_array, reference_images

PROMPT = "a lighthouse on a cliff, ink drawing"


@pytest.fixture(scope="module")
def sdxl_mesh(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    yield from running_mesh(model_cache, tmp_path_factory.mktemp("sdxl-logs"), workflows=["sdxl"])


@pytest.fixture(scope="module")
def sdxl_pipeline(settings):
    from shared.zoo import build_reference_pipeline

    return build_reference_pipeline(settings, family="sdxl")


def test_sdxl_is_listed_with_its_models_and_only_its_processes_run(sdxl_mesh: Mesh) -> None:
    listed = httpx.get(f"{sdxl_mesh.url}/v1/workflows", timeout=10).json()
    sdxl = next(w for w in listed["workflows"] if w["name"] == "sdxl")
    assert sdxl["models"] == ["clip-l", "clip-g", "sdxl-unet", "sdxl-vae"]
    assert sdxl["family"] == "sdxl" and sdxl["controlnets"] == [] and sdxl["loras"] == []
    assert not any(w["name"].startswith("sdxl-") for w in listed["workflows"])  # no variants
    units = {"encoder": ("clip-l", "clip-g"), "sdxl-unet": ("sdxl-unet",), "vae": ("sdxl-vae",)}
    assert sdxl_mesh.unit_models() == units
    assert httpx.get(f"{sdxl_mesh.url}/readyz", params={"workflow": "sdxl"}, timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("size", "steps", "guidance", "n", "negative"),
    [
        ("64x64", 4, 5.0, 1, "blurry, low quality"),
        ("96x64", 3, 7.5, 2, ""),  # zero negative embeddings (force_zeros_for_empty_prompt)
        ("64x96", 2, 1.0, 1, "fog"),  # guidance 1: no classifier-free guidance
    ],
)
def test_sdxl_image_equals_stable_diffusion_xl_pipeline(
    sdxl_mesh: Mesh, sdxl_pipeline, size: str, steps: int, guidance: float, n: int, negative: str
) -> None:
    seed = 4321
    body = {
        "workflow": "sdxl",
        "prompt": PROMPT,
        "negative_prompt": negative,
        "size": size,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "seed": seed,
        "n": n,
    }
    r = httpx.post(f"{sdxl_mesh.url}/v1/images/generations", json=body, timeout=300)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["workflow"] == "sdxl" and got["seed"] == seed and len(got["data"]) == n
    width, height = (int(v) for v in size.split("x"))
    want = reference_images(
        sdxl_pipeline,
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


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"controlnet": {"image": "AAAA"}}, "takes no controlnet"),
        ({"loras": [{"name": "sd3-lora-a"}]}, "takes no loras"),
    ],
)
def test_sdxl_refuses_controlnet_and_loras(sdxl_mesh: Mesh, extra: dict, message: str) -> None:
    body = {"workflow": "sdxl", "prompt": PROMPT, "size": "64x64", "num_inference_steps": 2, **extra}
    r = httpx.post(f"{sdxl_mesh.url}/v1/images/generations", json=body, timeout=30)
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]["message"]
