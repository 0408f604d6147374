"""The request schema's rules, without a server."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.gateway.schemas import ImageGenerationRequest, parse_size


@pytest.mark.parametrize(
    ("size", "expected"), [("512x512", (512, 512)), ("64x1024", (64, 1024)), ("192x128", (192, 128))]
)
def test_sizes_parse_as_width_by_height(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["500x512", "48x64", "1040x64", "512", "512x512x3", "-64x64", " 64x64"])
def test_bad_sizes_are_refused(size):
    with pytest.raises(ValueError):
        parse_size(size)


def test_defaults_are_sane():
    req = ImageGenerationRequest(prompt="a cat")
    assert (req.n, req.size, req.response_format, req.num_inference_steps, req.guidance_scale) == (
        1,
        "512x512",
        "b64_json",
        28,
        7.0,
    )


def test_types_are_strict():
    with pytest.raises(ValidationError):
        ImageGenerationRequest.model_validate({"prompt": "a", "n": "2"})
    with pytest.raises(ValidationError):
        ImageGenerationRequest.model_validate({"prompt": "a", "seed": 1.5})
    assert ImageGenerationRequest.model_validate({"prompt": "a", "guidance_scale": 3}).guidance_scale == 3.0
