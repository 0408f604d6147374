"""Bad input gets a 4xx JSON error with a code and a reason: never a 500, never a hang."""

from __future__ import annotations

import httpx
import pytest

GOOD = {"prompt": "a cat", "size": "64x64", "num_inference_steps": 2}


@pytest.mark.parametrize(
    ("change", "status", "code", "words"),
    [
        ({"workflow": "no-such-workflow"}, 404, "unknown_workflow", "sd3"),
        ({"size": "100x100"}, 422, "invalid_request", "multiples of 8"),
        ({"size": "72x72"}, 422, "invalid_request", "multiples of 16"),  # sd3's 2x2 patches; sd15/sdxl take it
        ({"size": "2048x2048"}, 422, "invalid_request", "between"),
        ({"size": "32x32"}, 422, "invalid_request", "between"),
        ({"size": "big"}, 422, "invalid_request", "WIDTHxHEIGHT"),
        ({"num_inference_steps": 0}, 422, "invalid_request", "num_inference_steps"),
        ({"num_inference_steps": 1000}, 422, "invalid_request", "num_inference_steps"),
        ({"n": 0}, 422, "invalid_request", "n:"),
        ({"n": 99}, 422, "invalid_request", "n:"),
        ({"n": "2"}, 422, "invalid_request", "integer"),
        ({"seed": "abc"}, 422, "invalid_request", "seed"),
        ({"guidance_scale": "high"}, 422, "invalid_request", "guidance_scale"),
        ({"prompt": ""}, 422, "invalid_request", "prompt"),
        ({"prompt": "   "}, 422, "invalid_request", "blank"),
        ({"prompt": "x" * 5000}, 422, "invalid_request", "prompt"),
        ({"prompt": 42}, 422, "invalid_request", "prompt"),
        ({"response_format": "link"}, 422, "invalid_request", "response_format"),
        ({"num_inference_step": 5}, 422, "invalid_request", "unknown field"),
        ({"timeout_s": 0}, 422, "invalid_request", "timeout_s"),
        ({"timeout_s": 5e-324}, 422, "invalid_request", "greater than or equal to 1"),
        ({"timeout_s": 99999}, 422, "invalid_request", "timeout_s"),
        ({"output_format": "gif"}, 400, "unsupported_value", "output_format='gif'"),  # the SDK's: not a 422
        ({"output_format": "bmp"}, 422, "invalid_request", "output_format"),
        ({"output_compression": 101}, 422, "invalid_request", "output_compression"),
        ({"output_quality": 80}, 422, "invalid_request", "jpeg and webp only"),
        ({"output_format": "jpeg", "output_quality": 0}, 422, "invalid_request", "output_quality"),
    ],
)
def test_bad_fields_are_refused_with_a_reason(mesh, change, status, code, words):
    r = httpx.post(f"{mesh.url}/v1/images/generations", json={**GOOD, **change}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code
    assert words in err["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"just a string"'])
def test_malformed_bodies_are_refused(mesh, raw):
    r = httpx.post(
        f"{mesh.url}/v1/images/generations", content=raw, headers={"content-type": "application/json"}, timeout=30
    )
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["message"]


def test_missing_prompt_is_named(mesh):
    r = httpx.post(f"{mesh.url}/v1/images/generations", json={"size": "64x64"}, timeout=30)
    assert r.status_code == 422
    assert "prompt" in r.json()["error"]["message"]


def test_unknown_request_and_route(mesh):
    r = httpx.get(f"{mesh.url}/v1/requests/nope", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_request"
    r = httpx.get(f"{mesh.url}/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_bad_request_id_header(mesh):
    r = httpx.post(f"{mesh.url}/v1/images/generations", json=GOOD, headers={"X-Request-Id": "a b/c"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request_id"


def _png(width: int, height: int) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"workflow": "sd3-controlnet"}, "needs 'controlnet'"),
        ({"workflow": "sd3-controlnet", "controlnet": {"image": _png(64, 64), "model": "flux-controlnet"}}, "known: "),
        ({"workflow": "sd3-controlnet", "controlnet": {"image": _png(96, 64)}}, "96x64 but size is 64x64"),
        ({"workflow": "sd3-controlnet", "controlnet": {"image": "aGVsbG8gd29ybGQ="}}, "not a PNG or JPEG"),
        ({"workflow": "sd3-controlnet", "controlnet": {"image": "%%% not base64"}}, "not valid base64"),
        ({"workflow": "sd3-controlnet", "controlnet": {"image": _png(64, 64), "conditioning_scale": 9}}, "scale"),
        ({"workflow": "sd3", "controlnet": {"image": _png(64, 64)}}, "takes no controlnet"),
        ({"workflow": "sd3-lora", "loras": [{"name": "no-such-lora"}]}, "known: sd3-lora-a, sd3-lora-b"),
        ({"workflow": "sd3-lora", "loras": [{"name": "flux-lora-a"}]}, "unknown LoRA 'flux-lora-a'"),
        ({"workflow": "sd3-lora", "loras": [{"name": "sd3-lora-a", "scale": 50}]}, "scale"),
        ({"workflow": "sd3-lora", "loras": [{"name": "sd3-lora-a"}, {"name": "sd3-lora-a"}]}, "once"),
        ({"workflow": "sd3-lora", "loras": [{"name": "sd3-lora-a"}] * 5}, "loras"),
        ({"workflow": "sd3", "loras": [{"name": "sd3-lora-a"}]}, "takes no loras"),
        ({"workflow": "flux", "negative_prompt": "blurry"}, "takes no negative_prompt"),
    ],
)
def test_bad_controlnet_and_lora_fields_are_refused_with_a_reason(mesh, change, words):
    r = httpx.post(f"{mesh.url}/v1/images/generations", json={**GOOD, **change}, timeout=30)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_request"
    assert words in err["message"], err["message"]


def test_a_body_over_the_size_limit_is_refused_with_the_limit_named(mesh):
    r = httpx.post(
        f"{mesh.url}/v1/images/generations",
        content=b'{"prompt": "' + b"x" * (16 * 2**20) + b'"}',
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["code"] == "body_too_large" and "16777216 bytes" in error["message"]


def test_a_chunked_body_over_the_limit_is_refused_too(mesh):
    """No Content-Length to trust: the gateway counts the bytes as they stream in."""

    def chunks():
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"x" * 2**20
        yield b'"}'

    r = httpx.post(
        f"{mesh.url}/v1/images/generations", content=chunks(), headers={"content-type": "application/json"}, timeout=60
    )
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "body_too_large"


def test_a_deeply_nested_body_is_a_400_not_a_crash(mesh):
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"prompt": "a", "loras": ' + b"[" * 50_000):
        r = httpx.post(
            f"{mesh.url}/v1/images/generations", content=raw, headers={"content-type": "application/json"}, timeout=30
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "too_deep"
    assert httpx.get(f"{mesh.url}/healthz", timeout=10).status_code == 200


def test_a_control_image_that_decodes_huge_is_refused_before_decoding(mesh):
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (20000, 20000), 0).save(buf, format="PNG", optimize=True)  # ~50 KB, 400 Mpixels
    bomb = base64.b64encode(buf.getvalue()).decode()
    body = {**GOOD, "workflow": "sd3-controlnet", "controlnet": {"image": bomb}}
    r = httpx.post(f"{mesh.url}/v1/images/generations", json=body, timeout=30)
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["code"] == "image_too_large" and "20000x20000" in error["message"]
