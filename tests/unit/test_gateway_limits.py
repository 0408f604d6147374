"""The gateway's limits on hostile input, without a server: body size and nesting (the ASGI
middleware), control-image pixels (admission), the shortest deadline (the schema), and the
message a passed deadline gives."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import time

import pytest
from pydantic import ValidationError

from services.gateway.admission import decode_control_image
from services.gateway.errors import APIError
from services.gateway.limits import MAX_JSON_DEPTH, BodyLimits, BodyRefused, DepthScanner
from services.gateway.schemas import MIN_TIMEOUT_S, ImageGenerationRequest

LIMIT = 1000


async def _echo_app(scope, receive, send):
    """Reads the whole body and answers its length: what a route does."""
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(size).encode()})


def _call(chunks: list[bytes], headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, bytes, int]:
    """Send `chunks` through BodyLimits(limit=LIMIT); (status, body, chunks it read)."""
    read = 0

    async def receive():
        nonlocal read
        read += 1
        return {"type": "http.request", "body": chunks[read - 1], "more_body": read < len(chunks)}

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers or []}
    asyncio.run(BodyLimits(_echo_app, max_body_bytes=LIMIT)(scope, receive, send))
    return sent[0]["status"], sent[1]["body"], read


def test_a_body_under_the_limit_reaches_the_app_whole():
    status, body, _ = _call([b"x" * 400, b"y" * 400, b"z" * 200])
    assert (status, body) == (200, b"1000")


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    status, body, read = _call([b"{}"], headers=[(b"content-length", b"1001")])
    assert status == 413 and read == 0
    error = json.loads(body)["error"]
    assert error["code"] == "body_too_large" and "1000 bytes" in error["message"]


def test_a_chunked_body_is_cut_off_once_past_the_limit():
    """No Content-Length: counted as it streams; the chunks after the limit are never read."""
    status, body, read = _call([b"x" * 600, b"x" * 600, b"x" * 600, b"x" * 600])
    assert status == 413 and read == 2
    assert json.loads(body)["error"]["code"] == "body_too_large"


def test_a_deeply_nested_body_is_refused_without_recursing():
    status, body, _ = _call([b"[" * 900])  # under the size limit, so the depth is what refuses it
    assert status == 400
    error = json.loads(body)["error"]
    assert error["code"] == "too_deep" and str(MAX_JSON_DEPTH) in error["message"]


def test_brackets_inside_strings_do_not_count():
    text = json.dumps({"prompt": "[[[{{{" * 100 + '\\"[[[', "loras": [{"name": "a"}]}).encode()
    assert _call([text])[0] == 200


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _nested(rng: random.Random, levels: int) -> object:
    if levels == 0:
        return rng.choice(['a"b\\', "x[{", 1, None, '\\"[', "]}", "\\\\"])
    if rng.random() < 0.5:
        return [_nested(rng, levels - 1) for _ in range(rng.randint(0, 3))]
    return {f'k"[{i}\\': _nested(rng, levels - 1) for i in range(rng.randint(0, 3))}


def test_the_depth_scan_agrees_with_the_parser_whatever_the_chunking():
    rng = random.Random(7)
    for _ in range(500):
        value = _nested(rng, rng.randint(0, 8))
        text, depth = json.dumps(value).encode(), _depth(value)
        for limit in {depth, max(depth - 1, 0)}:
            scanner, pos, refused = DepthScanner(limit), 0, False
            try:
                while pos < len(text):
                    step = rng.randint(1, 5)
                    scanner.feed(text[pos : pos + step])
                    pos += step
            except BodyRefused:
                refused = True
            assert refused == (depth > limit), (text, depth, limit)


def _png_b64(width: int, height: int, mode: str = "RGB") -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (width, height), 0).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def test_a_small_png_of_a_huge_image_is_refused_from_its_header():
    bomb = _png_b64(20000, 20000, mode="1")  # 400 Mpixels in a few tens of KB
    assert len(bomb) < 100_000
    start = time.perf_counter()
    with pytest.raises(APIError) as info:
        decode_control_image(bomb, 64, 64, max_pixels=1024 * 1024)
    assert time.perf_counter() - start < 1.0  # the pixels were never decoded
    assert info.value.status == 413 and info.value.code == "image_too_large"
    assert "20000x20000" in info.value.message and "1048576" in info.value.message


def test_an_image_over_the_pixel_limit_is_refused_even_at_the_requested_size():
    with pytest.raises(APIError) as info:
        decode_control_image(_png_b64(128, 128), 128, 128, max_pixels=64 * 64)
    assert info.value.status == 413 and "128x128" in info.value.message
    assert decode_control_image(_png_b64(64, 64), 64, 64, max_pixels=64 * 64).shape == (64, 64, 3)


def test_only_png_and_jpeg_are_decoded():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="BMP")
    with pytest.raises(APIError, match="not a PNG or JPEG"):
        decode_control_image(base64.b64encode(buf.getvalue()).decode(), 64, 64)


@pytest.mark.parametrize("timeout_s", [5e-324, 0.5, 0.999])
def test_a_deadline_under_the_minimum_is_refused(timeout_s):
    with pytest.raises(ValidationError, match="timeout_s"):
        ImageGenerationRequest.model_validate({"prompt": "0", "timeout_s": timeout_s})
    assert ImageGenerationRequest.model_validate({"prompt": "0", "timeout_s": MIN_TIMEOUT_S}).timeout_s == 1.0


def test_the_openapi_document_states_the_minimum_deadline():
    schema = ImageGenerationRequest.model_json_schema()["properties"]["timeout_s"]
    assert any(branch.get("minimum") == MIN_TIMEOUT_S for branch in schema["anyOf"])


def _timed_out(timeout_s: float | None) -> str:
    """The message of a request that timed out at denoising step 3 of 28."""
    from services.gateway.orchestrator import Orchestrator
    from services.gateway.request_state import RequestState
    from shared.messages import StepKind
    from shared.settings import Settings
    from shared.workflows.catalogue import catalogue

    async def run() -> str:
        workflow = catalogue()["sd3"]
        state = RequestState("r1", workflow, {}, deadline=0.0, timeout_s=timeout_s)
        for node in workflow.nodes:  # the encoders are done, the denoiser is running
            state.nodes.started.add(node.id)
            if node.kind == StepKind.ENCODE:
                state.nodes.done.add(node.id)
            if node.kind == StepKind.DENOISE:
                break
        state.denoising.step, state.denoising.total = 3, 28
        orchestrator = Orchestrator(bus=None, plane=None, settings=Settings(request_timeout_s=300))  # type: ignore[arg-type]
        error = orchestrator._deadline_error(state)
        assert error.code == "deadline_exceeded"
        return error.message

    return asyncio.run(run())


def test_a_client_deadline_passing_says_it_was_the_clients_and_where_the_request_was():
    message = _timed_out(5.0)
    assert "the request's deadline (timeout_s=5) passed" in message
    assert "step 3/28 of sd3-transformer" in message
    assert "service" not in message  # no hint at dead services: the client chose the deadline


def test_the_servers_own_timeout_still_hints_at_missing_services():
    message = _timed_out(None)
    assert "300s" in message and "is every service running?" in message


def test_a_multipart_body_is_counted_but_not_read_as_json():
    """An image edit's form carries binary files, where '[' bytes mean nothing: only its size is checked."""
    multipart = [(b"content-type", b"multipart/form-data; boundary=xyz")]
    status, body, _ = _call([b"[" * 900], headers=multipart)
    assert (status, body) == (200, b"900")
    status, _, _ = _call([b"[" * 600, b"[" * 600], headers=multipart)
    assert status == 413
