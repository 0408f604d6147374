"""`POST /v1/images/edits`' multipart form: its fields checked, its image and mask decoded.

Why apart from the route: the form is OpenAI's (`image`, `mask`, `prompt`, `n`, `size`,
`response_format`, `model`) plus the generation body's extras under the same names and
`strength`; every field arrives as text, so it is read leniently ("2" is the integer 2) into
`ImageEditForm`, and then becomes the same `ImageGenerationRequest` a generation is admitted
from, so both endpoints share one admission. Every refusal here is a 400 that names the field
and what it takes (an image of too many pixels: 413), before any work.

Masks follow OpenAI: a PNG with an alpha channel, of the image's size, repainted where it is
fully transparent (alpha 0), kept elsewhere. It is handed to the mesh in diffusers'
convention: uint8 (H, W), 255 where the image is repainted.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator

from services.gateway.errors import APIError
from services.gateway.openai_fields import unsupported
from services.gateway.schemas import (
    MAX_GUIDANCE,
    MAX_LORAS,
    MAX_PRIORITY,
    MAX_PROMPT_CHARS,
    MAX_SIDE,
    MAX_STEPS,
    MAX_TIMEOUT_S,
    MIN_SIDE,
    MIN_TIMEOUT_S,
    ImageGenerationRequest,
    LoraInput,
    OpenAIImageFields,
    parse_size,
)
from shared.tensor_plane import RawTensor

STRENGTH_IMG2IMG = 0.6  # diffusers' img2img pipelines' default
STRENGTH_INPAINT = 1.0  # the masked region repainted from noise, as OpenAI's edits
FILE_FIELDS = ("image", "mask")


class ImageEditForm(OpenAIImageFields):
    """The form's text fields (the files are `image` and `mask`): OpenAI's fields, as for a
    generation and with the same meanings and refusals (`openai_fields`), except `size`; our
    extras; `strength`. Read leniently: a form has only text, so "2" is 2 and "false" is False."""

    model_config = ConfigDict(strict=False, extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="what the edited image shows")
    size: str | None = Field(
        None,
        description=f"WIDTHxHEIGHT ({MIN_SIDE}-{MAX_SIDE}, the workflow's multiple): the image (and mask) are "
        "resized to it, as diffusers' pipelines resize; absent or 'auto': the image's size, rounded down to the "
        "workflow's multiple",
    )
    model: str | None = Field(None, description="OpenAI-compatible alias of `workflow`")
    workflow: str | None = Field(
        None, description="a text-to-image workflow (GET /v1/workflows), -lora ones included; not -controlnet"
    )
    strength: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description=f"how much of the image is redrawn, (0, 1]: default {STRENGTH_IMG2IMG} without a mask, "
        f"{STRENGTH_INPAINT} with one",
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    num_inference_steps: int = Field(28, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(7.0, ge=0.0, le=MAX_GUIDANCE)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    loras: str | None = Field(None, description='JSON list, e.g. [{"name": "sd3-lora-a", "scale": 0.8}]')
    priority: int = Field(0, ge=0, le=MAX_PRIORITY)
    wait: bool = True
    timeout_s: float | None = Field(None, ge=MIN_TIMEOUT_S, le=MAX_TIMEOUT_S)
    input_fidelity: Literal["high", "low"] | None = Field(
        None, description="accepted, no effect: `strength` sets how much of the image is kept"
    )

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is blank: describe the edited image")
        return value


@dataclass
class EditForm:
    fields: ImageEditForm
    image: bytes
    mask: bytes | None


def _bad(message: str) -> APIError:
    return APIError(400, "invalid_request", message)


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "form"
        msg = "unknown field" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid")
        parts.append(f"{loc}: {msg.removeprefix('Value error, ')}")
    return "; ".join(parts)


def parse_fields(text: dict[str, str]) -> ImageEditForm:
    """The form's text fields, or a 400 naming each bad one."""
    try:
        return ImageEditForm.model_validate(text)
    except ValidationError as exc:
        raise _bad(_describe(exc)) from None


async def read_form(form: Any) -> EditForm:
    """A Starlette form (multipart) into its fields and file bytes; 400 when `image` is missing,
    a field is sent twice or a file where text belongs."""
    text: dict[str, str] = {}
    files: dict[str, bytes] = {}
    loras: list[dict[str, Any]] = []
    for name, value in form.multi_items():
        key = name.removesuffix("[]")
        if key.startswith(_SDK_LORA) and isinstance(value, str):
            _sdk_lora_field(loras, key.removeprefix(_SDK_LORA).rstrip("]"), value)
            continue
        if key == "markup" or key.startswith("svg["):
            raise _unsupported_field(key)
        if key in text or key in files:
            raise _bad(f"{key}: sent more than once; edits take one image and at most one mask")
        if key in FILE_FIELDS:
            files[key] = await value.read() if hasattr(value, "read") else str(value).encode()
        elif hasattr(value, "read"):
            raise _bad(f"{key}: a file, where a text field belongs")
        else:
            text[key] = value
    if "image" not in files:
        raise _bad("image: missing; send the image to edit as a multipart/form-data file field 'image'")
    if loras:
        if "loras" in text:
            raise _bad("loras: sent both as JSON and as loras[][name] fields; send one")
        text["loras"] = json.dumps(loras)
    return EditForm(fields=parse_fields(text), image=files["image"], mask=files.get("mask"))


def _unsupported_field(key: str) -> APIError:
    """OpenAI's fields for outputs these models do not make (a markup overlay, SVG)."""
    if key == "markup":
        return unsupported("markup", "a file", "no markup overlay is drawn here", "send a mask (alpha 0: repaint)")
    return unsupported(key, "set", "these models draw raster images, not SVG", "send output_format png, jpeg or webp")


_SDK_LORA = "loras[]["  # how the openai SDK sends extra_body={"loras": [{"name": ..., "scale": ...}]}


def _sdk_lora_field(loras: list[dict[str, Any]], attr: str, value: str) -> None:
    """One `loras[][name]` / `loras[][scale]` field: a name starts the next LoRA, a scale is a number."""
    if attr == "name" or not loras or attr in loras[-1]:
        loras.append({})
    try:
        loras[-1][attr] = float(value) if attr == "scale" else value
    except ValueError:
        raise _bad(f"loras: scale {value!r} is not a number") from None


def _open(data: bytes, field: str, max_pixels: int, formats: list[str]) -> Any:
    """A lazily opened Pillow image (only the header read), refused beyond `max_pixels` (413)."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError:
        raise _too_large(field, None, max_pixels) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise _bad(f"{field}: not a readable {' or '.join(formats)} image") from None
    if img.size[0] * img.size[1] > max_pixels:
        raise _too_large(field, img.size, max_pixels)
    return img


def _too_large(field: str, size: tuple[int, int] | None, max_pixels: int) -> APIError:
    what = f"{size[0]}x{size[1]} ({size[0] * size[1]} pixels)" if size else "far more pixels"
    return APIError(
        413,
        "image_too_large",
        f"{field} is {what}, more than the gateway decodes ({max_pixels} pixels, LEGO_MAX_IMAGE_PIXELS)",
    )


def decode_image(data: bytes, max_pixels: int) -> RawTensor:
    """The image to edit: PNG, JPEG or WebP -> uint8 (H, W, 3) (transparency dropped)."""
    import numpy as np

    with _open(data, "image", max_pixels, ["PNG", "JPEG", "WEBP"]) as img:
        try:
            rgb = img.convert("RGB")
        except (OSError, SyntaxError, ValueError):
            raise _bad("image: not a readable PNG, JPEG or WEBP image (truncated?)") from None
    return RawTensor.from_numpy(np.asarray(rgb, dtype=np.uint8))


def decode_mask(data: bytes, image_size: tuple[int, int], max_pixels: int) -> RawTensor:
    """OpenAI's mask (a PNG or WebP with alpha, the image's size; alpha 0 = repaint) -> diffusers'
    uint8 (H, W), 255 where the image is repainted."""
    import numpy as np

    with _open(data, "mask", max_pixels, ["PNG", "WEBP"]) as img:
        if img.size != image_size:
            raise _bad(
                f"mask: {img.size[0]}x{img.size[1]}, but the image is {image_size[0]}x{image_size[1]}; "
                "send a mask of the image's size"
            )
        if "A" not in img.getbands() and "transparency" not in img.info:
            raise _bad("mask: has no alpha channel; send a PNG that is transparent (alpha 0) where to repaint")
        try:
            alpha = np.asarray(img.convert("RGBA"), dtype=np.uint8)[..., 3]
        except (OSError, SyntaxError, ValueError):
            raise _bad("mask: not a readable PNG or WEBP image (truncated?)") from None
    return RawTensor.from_numpy(np.where(alpha == 0, 255, 0).astype(np.uint8))


def edit_size(fields: ImageEditForm, image_size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """(width, height) of the output: `size`, or the image's own rounded down to `multiple`."""
    if fields.size is not None and fields.size != "auto":
        try:
            return parse_size(fields.size)
        except ValueError as exc:
            raise _bad(f"size: {exc}") from None
    width, height = (side - side % multiple for side in image_size)
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise _bad(
            f"size: the image is {image_size[0]}x{image_size[1]}; pass size (each side {MIN_SIDE}-{MAX_SIDE}, "
            f"a multiple of {multiple}) to resize it"
        )
    return width, height


def generation_body(fields: ImageEditForm, width: int, height: int) -> ImageGenerationRequest:
    """The generation body the edit is admitted as (same checks, same step params)."""
    loras = None
    if fields.loras is not None:
        try:
            raw = json.loads(fields.loras)
            if not isinstance(raw, list) or len(raw) > MAX_LORAS:
                raise ValueError(f"a JSON list of at most {MAX_LORAS}")
            loras = [LoraInput.model_validate(item) for item in raw]
        except (ValueError, ValidationError) as exc:
            raise _bad(f'loras: {exc}; send a JSON list such as [{{"name": "sd3-lora-a", "scale": 0.8}}]') from None
    body = fields.model_dump(exclude={"size", "strength", "loras", "input_fidelity"})
    return ImageGenerationRequest.model_validate(body | {"size": f"{width}x{height}", "loras": loras})
