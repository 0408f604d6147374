"""The official openai client, as a user drives it, against a gateway with API keys on: the
OpenAI Images fields it sends (response_format url, output_compression, size auto) are honoured,
and a value these models cannot honour is a 400 naming the field, never an unknown-field 422.
(The client's basic generation and auth are in test_api_keys.)"""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import LockedGateway
from tests.e2e.test_api_keys import bearer, make_key
from tests.waiting import wait_for

QUICK: dict[str, Any] = {"num_inference_steps": 2, "seed": 11}


@pytest.fixture(scope="module")
def key(locked_gateway: LockedGateway) -> str:
    admin = {"Authorization": f"Bearer {locked_gateway.admin_key}"}
    return make_key(locked_gateway, admin, "openai-sdk-user")


@pytest.fixture(scope="module")
def client(locked_gateway: LockedGateway, key: str) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{locked_gateway.url}/v1", api_key=key, max_retries=0, timeout=180)


def fetch_image(url: str) -> Any:
    """GET a link as a browser would: no API key."""
    from PIL import Image

    r = httpx.get(url, timeout=30)
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(r.content))
    assert r.headers["content-type"] == f"image/{image.format.lower()}"
    return image


def test_response_format_url_answers_a_link_that_serves_the_png(client, locked_gateway):
    result = client.images.generate(
        model="sd3", prompt="a lighthouse", size="64x64", response_format="url", extra_body=QUICK
    )
    (item,) = result.data
    assert item.b64_json is None and item.url.startswith(f"{locked_gateway.url}/v1/images/files/")
    image = fetch_image(item.url)
    assert (image.format, image.size) == ("PNG", (64, 64))
    inline = client.images.generate(model="sd3", prompt="a lighthouse", size="64x64", extra_body=QUICK)
    assert base64.b64decode(inline.data[0].b64_json) == httpx.get(item.url, timeout=30).content  # the same image
    gone = httpx.get(item.url.replace("/files/", "/files/x"), timeout=30)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "image_not_found"


def test_an_async_request_answers_links_too(locked_gateway, key):
    body = {"prompt": "a lighthouse", "size": "64x64", "response_format": "url", "wait": False, **QUICK}
    url = locked_gateway.url
    accepted = httpx.post(f"{url}/v1/images/generations", json=body, headers=bearer(key), timeout=30)
    assert accepted.status_code == 202, accepted.text
    status_url = url + accepted.json()["status_url"]

    def done() -> bool:
        return httpx.get(status_url, headers=bearer(key), timeout=10).json()["status"] != "running"

    wait_for("the async request to finish", done, timeout_s=120)
    status = httpx.get(status_url, headers=bearer(key), timeout=10).json()
    assert status["status"] == "succeeded", status
    assert fetch_image(status["data"][0]["url"]).size == (64, 64)


def test_output_compression_sets_the_jpeg_quality(client):
    def jpeg(compression: int) -> bytes:
        result = client.images.generate(
            model="sd3",
            prompt="a lighthouse",
            size="64x64",
            output_format="jpeg",
            output_compression=compression,
            extra_body=QUICK,
        )
        return base64.b64decode(result.data[0].b64_json)

    from PIL import Image

    low, high = jpeg(10), jpeg(95)
    assert Image.open(io.BytesIO(low)).format == "JPEG"
    assert len(low) < len(high)


def test_size_auto_is_the_workflows_trained_size(client):
    result = client.images.generate(model="sd15", prompt="a lighthouse", size="auto", extra_body=QUICK)
    assert result.size == "512x512"
    from PIL import Image

    assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).size == (512, 512)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"background": "transparent"}, "background"),
        ({"output_format": "gif"}, "output_format"),
        ({"output_format": "svg", "svg": {"model": "any"}}, "output_format"),
        ({"frame_count": 4}, "frame_count"),
        ({"partial_images": 2}, "partial_images"),
        ({"output_format": "jpeg", "output_compression": 50, "extra_body": {"output_quality": 90}}, "output_quality"),
    ],
)
def test_a_value_these_models_cannot_honour_is_a_400_naming_it(client, fields, named):
    import openai

    extra = {**QUICK, **fields.pop("extra_body", {})}
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(model="sd3", prompt="a lighthouse", size="64x64", extra_body=extra, **fields)
    assert refused.value.status_code == 400
    assert named in refused.value.message


def test_the_other_documented_fields_are_accepted(client):
    import openai

    result = client.images.generate(
        model="sd3",
        prompt="a lighthouse",
        size="64x64",
        background="opaque",
        moderation="low",
        quality="high",
        style="natural",
        complexity="low",
        safety_identifier="hashed-user-1",
        user="someone",
        n=1,
        partial_images=0,
        stream=False,
        extra_body=QUICK,
    )
    assert len(result.data) == 1
    with pytest.raises(openai.BadRequestError) as streamed:
        client.images.generate(model="sd3", prompt="a lighthouse", size="64x64", stream=True, extra_body=QUICK)
    assert "stream" in streamed.value.message
