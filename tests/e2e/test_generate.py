"""End to end through the REST API, as a user sees it; diffusers' own pipeline is the oracle."""

from __future__ import annotations

import subprocess
import sys

import httpx
import numpy as np
import pytest

from tests.oracle import assert_images_match, png_to_array, reference_images

PROMPT = "a watercolor fox in the snow"


@pytest.mark.parametrize(
    ("size", "steps", "guidance", "n", "negative"),
    [
        ("256x256", 8, 7.0, 1, ""),
        ("192x128", 4, 4.5, 2, "blurry, low quality"),
        ("128x128", 3, 1.0, 1, ""),  # guidance 1: no classifier-free guidance
    ],
)
def test_image_equals_diffusers_pipeline(mesh, reference_pipeline, size, steps, guidance, n, negative):
    seed = 1234
    r = httpx.post(
        f"{mesh.url}/v1/images/generations",
        json={
            "prompt": PROMPT,
            "size": size,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "seed": seed,
            "n": n,
            "negative_prompt": negative,
        },
        timeout=300,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seed"] == seed and body["workflow"] == "sd3"
    assert len(body["data"]) == n
    width, height = (int(v) for v in size.split("x"))
    want = reference_images(
        reference_pipeline,
        prompt=PROMPT,
        negative_prompt=negative,
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        seed=seed,
        n=n,
    )
    for item, expected in zip(body["data"], want, strict=True):
        got = png_to_array(item["b64_json"])
        assert got.shape == (height, width, 3)
        assert_images_match(got, expected)


def test_same_seed_same_image_different_seed_different_image(mesh):
    def generate(seed: int) -> np.ndarray:
        r = httpx.post(
            f"{mesh.url}/v1/images/generations",
            json={"prompt": PROMPT, "size": "64x64", "num_inference_steps": 2, "seed": seed},
            timeout=300,
        )
        assert r.status_code == 200, r.text
        return png_to_array(r.json()["data"][0]["b64_json"])

    a, b, c = generate(7), generate(7), generate(8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_jpeg_and_webp_carry_the_png_image(mesh):
    """The lossy formats (faster to write than PNG) carry the image the PNG carries, near enough:
    far nearer than another seed's image (the tiny models draw noise, the hardest case for them)."""
    import base64
    import io

    from PIL import Image

    def generate(seed: int = 11, **fmt) -> dict:
        body = {"prompt": PROMPT, "size": "128x96", "num_inference_steps": 2, "seed": seed, **fmt}
        r = httpx.post(f"{mesh.url}/v1/images/generations", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()

    png = generate()
    assert png["output_format"] == "png"
    exact = png_to_array(png["data"][0]["b64_json"]).astype(int)
    other = np.abs(png_to_array(generate(seed=12)["data"][0]["b64_json"]).astype(int) - exact).mean()
    for fmt, pil_name, options in (("jpeg", "JPEG", {}), ("webp", "WEBP", {"output_quality": 95})):
        got = generate(output_format=fmt, **options)
        assert got["output_format"] == fmt
        image = Image.open(io.BytesIO(base64.b64decode(got["data"][0]["b64_json"])))
        assert image.format == pil_name and image.size == (128, 96)
        error = np.abs(np.asarray(image.convert("RGB")).astype(int) - exact).mean()
        assert error < other / 2, (fmt, error, other)


def test_workflows_and_health(mesh):
    wf = httpx.get(f"{mesh.url}/v1/workflows", timeout=10).json()
    assert wf["default"] == "sd3"
    sd3 = next(w for w in wf["workflows"] if w["name"] == "sd3")
    assert sd3["models"] == ["clip-l", "clip-g", "t5", "sd3-transformer", "sd3-vae"]
    assert httpx.get(f"{mesh.url}/healthz", timeout=10).status_code == 200
    ready = httpx.get(f"{mesh.url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text


def test_request_status_after_completion(mesh):
    r = httpx.post(
        f"{mesh.url}/v1/images/generations",
        json={"prompt": PROMPT, "size": "64x64", "num_inference_steps": 3, "seed": 1},
        headers={"X-Request-Id": "status-probe-1"},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    status = httpx.get(f"{mesh.url}/v1/requests/status-probe-1", timeout=10).json()
    assert status["status"] == "succeeded"
    assert set(status["nodes"].values()) == {"done"}
    assert status["step"] == status["total_steps"] == 3


def test_lego_generate_cli_writes_png(mesh, tmp_path):
    out = tmp_path / "cli.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lego.cli",
            "generate",
            "a lighthouse",
            "-o",
            str(out),
            "--size",
            "96x64",
            "--steps",
            "3",
            "--seed",
            "5",
            "--url",
            mesh.url,
            "--progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    assert "denoising [" in proc.stderr and "3/3" in proc.stderr, proc.stderr  # progress from the events
    from PIL import Image

    assert Image.open(out).size == (96, 64)


def test_lego_generate_picks_the_format_from_the_file_name(mesh, tmp_path):
    def cli(output: str, *extra: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "lego.cli", "generate", "a lighthouse", "-o", str(tmp_path / output)]
        argv += ["--size", "64x64", "--steps", "2", "--url", mesh.url, *extra]
        return subprocess.run(argv, capture_output=True, text=True, timeout=300)

    proc = cli("out.jpg", "--quality", "80")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # a JPEG
    refused = cli("out.gif")
    assert refused.returncode == 2 and ".png, .jpg, .jpeg, .webp" in refused.stderr
    refused = cli("out.png", "--quality", "80")
    assert refused.returncode == 2 and "lossless" in refused.stderr


def test_reusing_a_request_id_runs_again_instead_of_hanging(mesh):
    body = {"prompt": PROMPT, "size": "64x64", "num_inference_steps": 2, "seed": 3}
    for _ in range(2):
        r = httpx.post(
            f"{mesh.url}/v1/images/generations", json=body, headers={"X-Request-Id": "reused-id"}, timeout=120
        )
        assert r.status_code == 200, r.text
        assert r.json()["request_id"] == "reused-id"


def test_concurrent_requests_each_get_their_own_image(mesh, reference_pipeline):
    from concurrent.futures import ThreadPoolExecutor

    cases = [("64x64", 11, "a red apple"), ("96x64", 12, "a blue car"), ("64x128", 13, "a green tree")]

    def call(case):
        size, seed, prompt = case
        body = {"prompt": prompt, "size": size, "num_inference_steps": 3, "seed": seed, "guidance_scale": 6.0}
        return httpx.post(f"{mesh.url}/v1/images/generations", json=body, timeout=300)

    with ThreadPoolExecutor(len(cases)) as pool:
        responses = list(pool.map(call, cases))
    for (size, seed, prompt), r in zip(cases, responses, strict=True):
        assert r.status_code == 200, r.text
        width, height = (int(v) for v in size.split("x"))
        [want] = reference_images(
            reference_pipeline, prompt=prompt, width=width, height=height, steps=3, guidance=6.0, seed=seed
        )
        assert_images_match(png_to_array(r.json()["data"][0]["b64_json"]), want)
