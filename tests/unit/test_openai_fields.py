"""The OpenAI Images fields the official SDK sends: what each comes to here (openai_fields), and
the image links of `response_format: "url"` (image_files), their expiry on an injected clock."""

from __future__ import annotations

import inspect

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from services.gateway.admission import admit
from services.gateway.app import create_app
from services.gateway.errors import APIError
from services.gateway.image_files import Delivery, ImageFiles
from services.gateway.openai_fields import resolve
from services.gateway.schemas import ImageGenerationRequest
from shared.settings import Settings
from shared.workflows.catalogue import catalogue

SD3, SD15 = catalogue()["sd3"], catalogue()["sd15"]


def body(**fields: object) -> ImageGenerationRequest:
    return ImageGenerationRequest.model_validate({"prompt": "a red fox", **fields})


def refusal(**fields: object) -> APIError:
    with pytest.raises(APIError) as caught:
        resolve(body(**fields), SD3)
    return caught.value


def test_every_parameter_of_the_sdks_images_generate_is_a_field_of_the_request():
    """No parameter the official SDK sends can meet an unknown-field 422."""
    from openai.resources.images import Images

    sdk = set(inspect.signature(Images.generate).parameters) - {"self", "extra_headers", "extra_query", "extra_body"}
    sdk -= {"timeout"}  # the client's own HTTP timeout, never sent
    assert sdk <= set(ImageGenerationRequest.model_fields), sdk - set(ImageGenerationRequest.model_fields)


def test_the_sdks_defaults_and_nulls_are_ours():
    fields = resolve(body(n=None, size=None, response_format=None, output_format=None), SD3)
    assert (fields.n, fields.width, fields.height, fields.response_format) == (1, 512, 512, "b64_json")
    assert fields.encoding.format == "png"
    accepted = body(
        background="opaque",
        moderation="low",
        quality="high",
        style="vivid",
        complexity="low",
        safety_identifier="user-hash-1",
        user="someone",
        stream=False,
        partial_images=0,
    )
    assert resolve(accepted, SD3) == resolve(body(), SD3)  # accepted, and they change nothing
    assert resolve(body(background="auto", moderation="auto"), SD3) == resolve(body(), SD3)


def test_size_auto_is_the_size_the_family_was_trained_at():
    assert (resolve(body(size="auto"), SD3).width, resolve(body(size="auto"), SD3).height) == (1024, 1024)
    assert (resolve(body(size="auto"), SD15).width, resolve(body(size="auto"), SD15).height) == (512, 512)
    admitted = admit(body(size="auto", workflow="sd15"), SD15)
    assert (admitted.request.width, admitted.request.height) == (512, 512)


def test_output_compression_is_output_quality():
    assert resolve(body(output_format="jpeg", output_compression=40), SD3).encoding.quality == 40
    assert resolve(body(output_format="webp", output_compression=0), SD3).encoding.quality == 1
    same = body(output_format="jpeg", output_compression=70, output_quality=70)
    assert resolve(same, SD3).encoding.quality == 70
    clash = refusal(output_format="jpeg", output_compression=70, output_quality=90)
    assert clash.status == 400 and "output_compression" in clash.message and "output_quality" in clash.message
    png = refusal(output_compression=80)
    assert png.status == 422 and "output_compression applies to jpeg and webp only" in png.message


@pytest.mark.parametrize(
    ("fields", "named", "instead"),
    [
        ({"background": "transparent"}, "background='transparent'", "opaque"),
        ({"output_format": "gif"}, "output_format='gif'", "png, jpeg or webp"),
        ({"output_format": "svg"}, "output_format='svg'", "png, jpeg or webp"),
        ({"frame_count": 4}, "frame_count=4", "omit it"),
        ({"frame_duration_ms": 100}, "frame_duration_ms=100", "omit it"),
        ({"svg": {"model": "x"}}, "svg=", "omit it"),
        ({"stream": True}, "stream=True", "events_url"),
        ({"partial_images": 2}, "partial_images=2", "send 0"),
    ],
)
def test_a_value_these_models_cannot_honour_is_a_400_naming_the_field(fields, named, instead):
    error = refusal(**fields)
    assert (error.status, error.code) == (400, "unsupported_value")
    assert error.message.startswith(named) and instead in error.message


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_link_serves_its_image_until_it_expires_then_says_it_expired():
    clock = Clock()
    files = ImageFiles(ttl_s=3600, max_bytes=1000, clock=clock)
    file_id = files.put(b"png bytes", "png")
    assert file_id.endswith(".png") and len(file_id) > 40  # a random token: not guessable
    assert files.put(b"png bytes", "png") != file_id
    clock.now += 3599
    stored = files.get(file_id)
    assert (stored.data, stored.media_type, stored.max_age(clock.now)) == (b"png bytes", "image/png", 1)
    clock.now += 1
    with pytest.raises(APIError) as gone:
        files.get(file_id)
    assert gone.value.status == 404 and "expired at" in gone.value.message
    assert len(files) == 0 and files.bytes_held == 0  # expired images are dropped, not kept
    with pytest.raises(APIError) as unknown:
        files.get("not-a-link")
    assert "not one it made" in unknown.value.message


def test_a_full_store_drops_the_oldest_and_says_so():
    clock = Clock()
    files = ImageFiles(ttl_s=60, max_bytes=10, clock=clock)
    first, second = files.put(b"aaaa", "jpeg"), files.put(b"bbbb", "webp")
    third = files.put(b"cccc", "png")  # 12 bytes > 10: the oldest goes
    assert files.bytes_held == 8 and files.get(second).media_type == "image/webp"
    assert files.get(third).data == b"cccc"
    with pytest.raises(APIError) as dropped:
        files.get(first)
    assert "before its expiry" in dropped.value.message and "LEGO_IMAGE_URL_MAX_MB" in dropped.value.message
    big = files.put(b"x" * 50, "png")  # larger than the whole store: kept alone
    assert len(files) == 1 and files.get(big).data == b"x" * 50


def test_url_delivery_answers_absolute_links_on_the_request_base_url():
    files = ImageFiles(ttl_s=60, max_bytes=1000)
    data = Delivery("url", files, "https://images.example:8443/").data([b"one", b"two"], "jpeg")
    assert all(d.b64_json is None and d.url is not None for d in data)
    urls = [d.url for d in data]
    assert all(u.startswith("https://images.example:8443/v1/images/files/") for u in urls)
    assert [files.get(u.rsplit("/", 1)[1]).data for u in urls] == [b"one", b"two"]
    assert Delivery().data([b"one"], "png")[0].b64_json == "b25l"


def test_the_link_route_needs_no_api_key_and_sends_the_image_type():
    app: FastAPI = create_app(Settings(auth="on"))  # keys on; no lifespan: the route needs only the store
    clock = Clock()
    files = app.state.image_files = ImageFiles(ttl_s=10, max_bytes=1000, clock=clock)
    file_id = files.put(b"\xff\xd8jpeg", "jpeg")
    client = TestClient(app)
    r: httpx.Response = client.get(f"/v1/images/files/{file_id}")
    assert r.status_code == 200 and r.content == b"\xff\xd8jpeg"
    assert r.headers["content-type"] == "image/jpeg" and r.headers["x-content-type-options"] == "nosniff"
    clock.now += 10
    r = client.get(f"/v1/images/files/{file_id}")
    assert r.status_code == 404 and "expired" in r.json()["error"]["message"]
