"""Admission: checks a request against its workflow and turns it into step params and tensors.

Why here and not in the schemas: whether `controlnet`, `loras` or a negative prompt are
allowed, and which names are valid, depends on the chosen workflow. Every refusal is a 422
that names what was wrong and what is accepted (a control image too large to decode is a 413);
nothing reaches the mesh that a service would have to refuse later.
"""

from __future__ import annotations

import base64
import binascii
import io
import secrets
from dataclasses import dataclass, field

from services.gateway.encoding import ImageEncoding
from services.gateway.errors import APIError
from services.gateway.openai_fields import ResponseFormat, resolve
from services.gateway.schemas import ImageGenerationRequest
from shared.messages import ControlNetChoice, LoraChoice, StepParams
from shared.settings import Settings
from shared.tensor_plane import RawTensor
from shared.workflows.catalogue import catalogue
from shared.workflows.spec import WorkflowSpec
from shared.workflows.step_params import RequestParams, step_params
from shared.workflows.variants import CONTROL_IMAGE


@dataclass
class Admitted:
    """What the orchestrator runs: the request, each node's typed params, and tensors it carries."""

    request: RequestParams
    steps: dict[str, StepParams]
    tensors: dict[str, RawTensor] = field(default_factory=dict)
    encoding: ImageEncoding = field(default_factory=ImageEncoding)
    response_format: ResponseFormat = "b64_json"


def _invalid(message: str) -> APIError:
    return APIError(422, "invalid_request", message)


def admit(
    body: ImageGenerationRequest,
    workflow: WorkflowSpec,
    max_image_pixels: int = Settings.max_image_pixels,
    strength: float | None = None,
) -> Admitted:
    """Validate `body` for `workflow` (raises APIError 422, or 413 for a control image of more
    than `max_image_pixels`) and build its params; decodes the control image, so call it off
    the event loop. `strength`: an edit's (its workflow from `shared.workflows.edits`)."""
    fields = resolve(body, workflow)  # the OpenAI fields: size, n, encoding, response_format (or 400)
    width, height = fields.width, fields.height
    tensors: dict[str, RawTensor] = {}
    controlnet = None
    if workflow.controlnets:
        controlnet, tensors[CONTROL_IMAGE] = _controlnet(body, workflow, width, height, max_image_pixels)
    elif body.controlnet is not None:
        raise _invalid(f"workflow {workflow.name!r} takes no controlnet" + _variant_hint(workflow, "-controlnet"))
    if not workflow.loras and body.loras:
        raise _invalid(f"workflow {workflow.name!r} takes no loras" + _variant_hint(workflow, "-lora"))
    request = RequestParams(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        height=height,
        width=width,
        num_inference_steps=body.num_inference_steps,
        guidance_scale=body.guidance_scale,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**63),
        n=fields.n,
        controlnet=controlnet,
        loras=_loras(body, workflow) if workflow.loras else [],
        strength=strength,
    )
    try:
        steps = step_params(workflow, request)
    except ValueError as exc:  # what the workflow's family cannot take (its size multiple, ...)
        raise _invalid(str(exc)) from exc
    return Admitted(
        request=request, steps=steps, tensors=tensors, encoding=fields.encoding, response_format=fields.response_format
    )


def _variant_hint(workflow: WorkflowSpec, suffix: str) -> str:
    """Where to go instead: the family's `suffix` variants, or that it has none (sd15)."""
    controlnet = suffix == "-controlnet"
    family = [w for w in catalogue().values() if w.family == workflow.family]
    if not any(w.controlnets if controlnet else w.loras for w in family):
        return f" (the {workflow.family} family has no {suffix[1:]} workflows)"
    return f"; use {workflow.name}-controlnet" if controlnet else "; use a '-lora' workflow"


def _controlnet(
    body: ImageGenerationRequest, workflow: WorkflowSpec, width: int, height: int, max_pixels: int
) -> tuple[ControlNetChoice, RawTensor]:
    cn = body.controlnet
    if cn is None:
        raise _invalid(
            f"workflow {workflow.name!r} needs 'controlnet': {{'image': <base64 PNG of {width}x{height}>, "
            "'conditioning_scale': 1.0}"
        )
    model = cn.model or workflow.controlnets[0]
    if model not in workflow.controlnets:
        raise _invalid(
            f"unknown controlnet {model!r} for workflow {workflow.name!r}; known: {', '.join(workflow.controlnets)}"
        )
    pixels = decode_control_image(cn.image, width, height, max_pixels)
    return ControlNetChoice(model=model, conditioning_scale=cn.conditioning_scale), pixels


def decode_control_image(b64: str, width: int, height: int, max_pixels: int = Settings.max_image_pixels) -> RawTensor:
    """base64 PNG/JPEG -> uint8 (H, W, 3). It must already have the requested size: resizing
    silently would move the edges the ControlNet follows.

    Hostile images: only the header is read before the checks (Pillow decodes lazily), so a
    few-KB PNG that would decode to 20000x20000 is refused without allocating its pixels; and
    only PNG and JPEG decoders are tried, not every format Pillow knows. The body's size
    is bounded already (LEGO_MAX_BODY_BYTES)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid("controlnet.image is not valid base64") from None
    if (header := _png_size(data)) is not None:
        _check_control_size(header, width, height, max_pixels)
    try:
        with Image.open(io.BytesIO(data), formats=["PNG", "JPEG"]) as img:
            _check_control_size(img.size, width, height, max_pixels)
            rgb = img.convert("RGB")
    except Image.DecompressionBombError:  # Pillow's own limit (far above ours), met while reading the header
        raise _too_large(None, max_pixels) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise _invalid("controlnet.image is not a PNG or JPEG image") from None
    return RawTensor.from_numpy(np.asarray(rgb, dtype=np.uint8))


def _png_size(data: bytes) -> tuple[int, int] | None:
    """A PNG's (width, height) from its first chunk (IHDR), or None for anything else: read
    here so the error can name the size before Pillow's own bomb check refuses it unnamed."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _check_control_size(size: tuple[int, int], width: int, height: int, max_pixels: int) -> None:
    """From the image's header: refuse more pixels than the limit (413), then another size (422)."""
    if size[0] * size[1] > max_pixels:
        raise _too_large(size, max_pixels)
    if size != (width, height):
        raise _invalid(
            f"controlnet.image is {size[0]}x{size[1]} but size is {width}x{height}; "
            "send a control image of the requested size"
        )


def _too_large(size: tuple[int, int] | None, max_pixels: int) -> APIError:
    what = f"{size[0]}x{size[1]} ({size[0] * size[1]} pixels)" if size else "far more pixels"
    return APIError(
        413,
        "image_too_large",
        f"controlnet.image is {what}, more than the gateway decodes ({max_pixels} pixels, LEGO_MAX_IMAGE_PIXELS); "
        "send a control image of the requested size",
    )


def _loras(body: ImageGenerationRequest, workflow: WorkflowSpec) -> list[LoraChoice]:
    chosen = body.loras if body.loras is not None else workflow.default_loras
    names = [lora.name for lora in chosen]
    unknown = [n for n in names if n not in workflow.loras]
    if unknown:
        known = ", ".join(workflow.loras[:20]) + (", ... (GET /v1/loras lists all)" if len(workflow.loras) > 20 else "")
        raise _invalid(f"unknown LoRA {unknown[0]!r} for workflow {workflow.name!r}; known: {known}")
    if len(set(names)) != len(names):
        raise _invalid("each LoRA may be named once in 'loras'")
    return [LoraChoice(name=lora.name, scale=float(lora.scale)) for lora in chosen]
