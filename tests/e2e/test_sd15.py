"""The sd15 workflow through the REST API, on a mesh started for it alone (its three models:
sd15-clip, sd15-unet, sd15-vae): listed, validated, and its images equal diffusers'
`StableDiffusionPipeline` built from the same directory, with and without classifier-free
guidance."""

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
def sd15_mesh(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    yield from running_mesh(model_cache, tmp_path_factory.mktemp("sd15-logs"), workflows=["sd15"])


@pytest.fixture(scope="module")
def sd15_pipeline(settings):
    from shared.zoo import build_reference_pipeline

    return build_reference_pipeline(settings, family="sd15")


def test_sd15_is_listed_with_its_models_and_only_its_processes_run(sd15_mesh: Mesh) -> None:
    listed = httpx.get(f"{sd15_mesh.url}/v1/workflows", timeout=10).json()
    sd15 = next(w for w in listed["workflows"] if w["name"] == "sd15")
    assert sd15["models"] == ["sd15-clip", "sd15-unet", "sd15-vae"]
    assert sd15["family"] == "sd15" and sd15["controlnets"] == [] and sd15["loras"] == []
    assert not any(w["name"].startswith("sd15-") for w in listed["workflows"])  # no variants
    assert sd15_mesh.unit_models() == {"encoder": ("sd15-clip",), "sd15-unet": ("sd15-unet",), "vae": ("sd15-vae",)}
    assert httpx.get(f"{sd15_mesh.url}/readyz", params={"workflow": "sd15"}, timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("size", "steps", "guidance", "n", "negative"),
    [
        ("64x64", 4, 7.5, 1, "blurry, low quality"),
        ("96x64", 3, 1.0, 2, ""),  # guidance 1: no classifier-free guidance
    ],
)
def test_sd15_image_equals_stable_diffusion_pipeline(
    sd15_mesh: Mesh, sd15_pipeline, size: str, steps: int, guidance: float, n: int, negative: str
) -> None:
    seed = 4321
    body = {
        "workflow": "sd15",
        "prompt": PROMPT,
        "negative_prompt": negative,
        "size": size,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "seed": seed,
        "n": n,
    }
    r = httpx.post(f"{sd15_mesh.url}/v1/images/generations", json=body, timeout=300)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["workflow"] == "sd15" and got["seed"] == seed and len(got["data"]) == n
    width, height = (int(v) for v in size.split("x"))
    want = reference_images(
        sd15_pipeline,
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
def test_sd15_refuses_controlnet_and_loras(sd15_mesh: Mesh, extra: dict, message: str) -> None:
    body = {"workflow": "sd15", "prompt": PROMPT, "size": "64x64", "num_inference_steps": 2, **extra}
    r = httpx.post(f"{sd15_mesh.url}/v1/images/generations", json=body, timeout=30)
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]["message"]
