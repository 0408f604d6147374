"""The oracle holds whichever transport carries the tensors: every pair is forced to TCP (the
cross-host path), then to UCX (the optional `.[ucx]` extra; over TCP on a CPU machine), with
latents and images too big to ride inline. Forced means a read that cannot use that transport
fails the request; every process, gateway included, must also exit cleanly (running_mesh
checks none is left behind, e.g. by a UCX thread blocking exit).

Both meshes are shared (tests/e2e/conftest.py): the tcp one with the overload and observability
tests, the ucx one with the batching tests (a lone request runs the unbatched path)."""

from __future__ import annotations

import httpx
import pytest

from lego.launcher import Mesh
from shared.tensor_plane.ucx import ucx_installed
from tests.oracle import assert_images_match, png_to_array, reference_images

NEEDS_UCX = pytest.mark.skipif(not ucx_installed(), reason="needs the ucx extra: pip install '.[ucx]'")


@pytest.fixture(scope="module", params=["tcp", pytest.param("ucx", marks=NEEDS_UCX)])
def forced_mesh(request) -> Mesh:
    return request.getfixturevalue({"tcp": "sd3_tcp_mesh", "ucx": "batching_mesh"}[request.param])


def test_forced_transport_gives_the_pipeline_image(forced_mesh, reference_pipeline):
    body = {"prompt": "a tram at night", "size": "320x320", "num_inference_steps": 4, "seed": 21, "guidance_scale": 6.0}
    r = httpx.post(f"{forced_mesh.url}/v1/images/generations", json=body, timeout=300)
    assert r.status_code == 200, r.text
    [want] = reference_images(
        reference_pipeline, prompt=body["prompt"], width=320, height=320, steps=4, guidance=6.0, seed=21
    )
    assert_images_match(png_to_array(r.json()["data"][0]["b64_json"]), want)
