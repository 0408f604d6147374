"""The oracle holds with every tensor pair forced over UCX (the optional `.[ucx]` extra; over TCP
on a CPU machine): latents and images too big to ride inline are pulled through ucxx endpoints
(forced means a read that cannot go over UCX fails the request), and every process, gateway
included, exits cleanly although UCX ran threads in it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from lego.launcher import Mesh
from shared.tensor_plane.ucx import ucx_installed
from tests.conftest import running_mesh
from tests.oracle import assert_images_match, png_to_array, reference_images

pytestmark = pytest.mark.skipif(not ucx_installed(), reason="needs the ucx extra: pip install '.[ucx]'")


@pytest.fixture(scope="module")
def ucx_mesh(model_cache, tmp_path_factory) -> Iterator[Mesh]:
    # running_mesh checks that no process is left behind after stop (a UCX thread blocking exit).
    yield from running_mesh(
        model_cache,
        tmp_path_factory.mktemp("ucx-mesh-logs"),
        workflows=["sd3"],
        LEGO_TRANSPORT="ucx",
        LEGO_INLINE_MAX_BYTES="1024",
    )


def test_ucx_transport_gives_the_pipeline_image(ucx_mesh, reference_pipeline):
    body = {"prompt": "a tram at night", "size": "320x320", "num_inference_steps": 4, "seed": 21, "guidance_scale": 6.0}
    r = httpx.post(f"{ucx_mesh.url}/v1/images/generations", json=body, timeout=300)
    assert r.status_code == 200, r.text
    [want] = reference_images(
        reference_pipeline, prompt=body["prompt"], width=320, height=320, steps=4, guidance=6.0, seed=21
    )
    assert_images_match(png_to_array(r.json()["data"][0]["b64_json"]), want)
