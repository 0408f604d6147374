"""The oracle holds whichever transport carries the tensors: here every pair is forced to TCP
(the cross-host path), with latents and images too big to ride inline."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from lego.launcher import Mesh
from tests.conftest import running_mesh
from tests.oracle import assert_images_match, png_to_array, reference_images


@pytest.fixture(scope="module")
def tcp_mesh(model_cache, tmp_path_factory) -> Iterator[Mesh]:
    yield from running_mesh(
        model_cache,
        tmp_path_factory.mktemp("tcp-mesh-logs"),
        workflows=["sd3"],
        LEGO_TRANSPORT="tcp",
        LEGO_INLINE_MAX_BYTES="1024",
    )


def test_tcp_transport_gives_the_pipeline_image(tcp_mesh, reference_pipeline):
    body = {"prompt": "a tram at night", "size": "320x320", "num_inference_steps": 4, "seed": 21, "guidance_scale": 6.0}
    r = httpx.post(f"{tcp_mesh.url}/v1/images/generations", json=body, timeout=300)
    assert r.status_code == 200, r.text
    [want] = reference_images(
        reference_pipeline, prompt=body["prompt"], width=320, height=320, steps=4, guidance=6.0, seed=21
    )
    assert_images_match(png_to_array(r.json()["data"][0]["b64_json"]), want)
