"""Batching through the mesh: with LEGO_DENOISE_MAX_BATCH=4 (and the encoders, VAE and ControlNet
batching what queues up), requests sent at once share the denoiser's transformer calls (and
ControlNet requests the adapters' ControlNet calls), and each still gets the pipeline's image.

(Batching is on by default only on a GPU; this mesh turns it on, on the CPU, to test it. The
mesh, tests/e2e/conftest.py's `batching_mesh`, also carries the transport test's forced-UCX case
where the ucx extra is installed.)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
from prometheus_client.parser import text_string_to_metric_families

from lego.launcher import Mesh
from tests.oracle import assert_images_match, png_to_array, reference_images

PROMPTS = ["a fox in the snow", "a lighthouse at dusk", "a bowl of ramen", "a paper boat on a pond"]


def _post_at_once(mesh: Mesh, bodies: list[dict]) -> list[httpx.Response]:
    """All requests sent at the same moment, so their steps meet in the services' queues."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: httpx.post(f"{mesh.url}/v1/images/generations", json=b, timeout=300), bodies))


def _batch_sizes(mesh: Mesh, kind: str = "denoise", model: str = "sd3-transformer") -> tuple[float, float]:
    """(calls, calls of one step) from the /metrics batch-size histogram of the model's replica."""
    models = httpx.get(f"{mesh.url}/v1/models", timeout=10).json()["models"]
    [info] = [m for m in models if m["model_id"] == model]
    [replica] = info["replicas"]
    assert replica["batch_size"] == 4  # what /v1/models tells a user
    count = ones = 0.0
    for family in text_string_to_metric_families(httpx.get(replica["metrics_url"], timeout=10).text):
        for s in family.samples:
            if s.labels.get("kind") != kind or s.labels.get("model") != model:
                continue
            if s.name == "lego_batch_size_count":
                count = s.value
            elif s.name == "lego_batch_size_bucket" and float(s.labels["le"]) == 1.0:
                ones = s.value
    return count, ones


def test_requests_at_once_share_calls_and_each_gets_its_image(batching_mesh: Mesh, reference_pipeline) -> None:
    # Loops long enough (about 2 s each here) to overlap although the encoders finish the four
    # requests one after the other.
    steps, size = 30, 256
    bodies = [
        {"prompt": p, "size": f"{size}x{size}", "num_inference_steps": steps, "guidance_scale": 5.0, "seed": 30 + i}
        for i, p in enumerate(PROMPTS)
    ]
    answers = _post_at_once(batching_mesh, bodies)
    for body, r in zip(bodies, answers, strict=True):
        assert r.status_code == 200, r.text
        want = reference_images(
            reference_pipeline,
            prompt=body["prompt"],
            width=size,
            height=size,
            steps=steps,
            guidance=5.0,
            seed=body["seed"],
        )[0]
        assert_images_match(png_to_array(r.json()["data"][0]["b64_json"]), want)
    calls, alone = _batch_sizes(batching_mesh)
    # 4 x 30 steps in fewer calls than that: some calls carried several requests.
    assert alone < calls < len(bodies) * steps, (calls, alone)


def test_controlnet_requests_at_once_share_the_adapters_calls(batching_mesh: Mesh, settings) -> None:
    from baseline.pipelines import build_reference_pipeline
    from tests.e2e.test_catalogue_oracle import _b64png, control_image

    steps, size = 20, 256
    control = control_image(size, size)
    bodies = [
        {
            "workflow": "sd3-controlnet",
            "prompt": p,
            "size": f"{size}x{size}",
            "num_inference_steps": steps,
            "guidance_scale": 5.0,
            "seed": 50 + i,
            "controlnet": {"image": _b64png(control), "conditioning_scale": 0.8},
        }
        for i, p in enumerate(PROMPTS[:3])
    ]
    answers = _post_at_once(batching_mesh, bodies)
    pipe = build_reference_pipeline(settings, family="sd3", controlnet=True)
    for body, r in zip(bodies, answers, strict=True):
        assert r.status_code == 200, r.text
        want = reference_images(
            pipe,
            prompt=body["prompt"],
            width=size,
            height=size,
            steps=steps,
            guidance=5.0,
            seed=body["seed"],
            control_image=control,
            conditioning_scale=0.8,
        )[0]
        assert_images_match(png_to_array(r.json()["data"][0]["b64_json"]), want)
    calls, alone = _batch_sizes(batching_mesh, "controlnet", "sd3-controlnet")
    assert alone < calls < len(bodies) * steps, (calls, alone)  # some ControlNet calls served several requests
