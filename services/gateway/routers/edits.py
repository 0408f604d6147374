"""`POST /v1/images/edits`: OpenAI's image edits (multipart) on the mesh: image-to-image without
a mask, inpainting with one.

An edit runs its workflow's edit variant (`shared.workflows.edits`: the family's VAE encodes
the image, the denoiser starts from it), admitted as a generation is (`admission.admit`, from
the same body the form becomes), with the same request ids, priority, rate limit, overload
refusal, progress events, cancel and answers; the image and mask travel as request tensors.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from services.gateway.admission import Admitted, admit
from services.gateway.deps import GatewayDep, OwnerDep, RateLimiterDep, SettingsDep
from services.gateway.edit_form import (
    STRENGTH_IMG2IMG,
    STRENGTH_INPAINT,
    EditForm,
    ImageEditForm,
    decode_image,
    decode_mask,
    edit_size,
    generation_body,
    read_form,
)
from services.gateway.errors import APIError
from services.gateway.headers import IdempotencyKeyHeader, RequestIdDep
from services.gateway.idempotency import body_hash
from services.gateway.keys.auth import Caller
from services.gateway.keys.limits import check_priority
from services.gateway.loras import bind
from services.gateway.routers.images import ERRORS
from services.gateway.schemas import AsyncAccepted, ErrorResponse, ImageGenerationResponse
from services.gateway.taking import NewRequest, take
from shared.workflows.catalogue import catalogue
from shared.workflows.edits import EDIT_IMAGE, EDIT_MASK, EditError, edit_workflow
from shared.zoo.families import family

router = APIRouter()


def _body_document() -> dict[str, Any]:
    """The multipart body, stated in the OpenAPI document (the route reads the form itself, so
    that every bad field is one 400 naming it)."""
    schema = ImageEditForm.model_json_schema()
    schema["properties"] |= {
        "image": {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP to edit"},
        "mask": {
            "type": "string",
            "format": "binary",
            "description": "PNG with alpha, the image's size: repainted where fully transparent (alpha 0)",
        },
    }
    schema["required"] = ["image", "prompt"]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


@router.post(
    "/v1/images/edits",
    response_model=ImageGenerationResponse,
    responses={
        **ERRORS,
        400: {"model": ErrorResponse, "description": "a bad form field, an unreadable image, a mask of another size"},
        202: {"model": AsyncAccepted, "description": "accepted (`wait: false`)"},
    },
    openapi_extra=_body_document(),
)
async def edit(
    request: Request,
    settings: SettingsDep,
    gateway: GatewayDep,
    caller: Caller,
    owner: OwnerDep,
    rate_limiter: RateLimiterDep,
    request_id: RequestIdDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> ImageGenerationResponse | JSONResponse:
    """Edit an image: without `mask`, image-to-image (the whole image redrawn, `strength` of the
    way); with one, inpainting (only where the mask is transparent). The image and mask are
    resized to `size` (default: the image's size, rounded down to the workflow's multiple).
    With an `Idempotency-Key`, a retry of the same form (image, mask and fields) answers the
    request the key named first, on any gateway."""
    async with request.form(max_files=2, max_fields=64) as form:
        sent = await read_form(form)
    fields = sent.fields
    name = fields.workflow or fields.model or settings.default_workflow
    if name not in catalogue():
        raise APIError(404, "unknown_workflow", f"unknown workflow {name!r}; known: {', '.join(sorted(catalogue()))}")
    try:
        workflow = bind(edit_workflow(name, inpaint=sent.mask is not None), gateway.loras)  # the registry's LoRAs
    except EditError as exc:
        raise APIError(400, "invalid_request", str(exc)) from None
    image = await asyncio.to_thread(decode_image, sent.image, settings.max_image_pixels)
    image_size = (image.shape[1], image.shape[0])
    tensors = {EDIT_IMAGE: image}
    if sent.mask is not None:
        tensors[EDIT_MASK] = await asyncio.to_thread(decode_mask, sent.mask, image_size, settings.max_image_pixels)
    width, height = edit_size(fields, image_size, family(workflow.family).size_multiple)
    body = generation_body(fields, width, height)
    strength = fields.strength or (STRENGTH_INPAINT if sent.mask is not None else STRENGTH_IMG2IMG)
    check_priority(caller, body.priority)

    async def admitted() -> Admitted:
        ready = await asyncio.to_thread(admit, body, workflow, settings.max_image_pixels, strength)
        ready.tensors |= tensors  # the image and mask travel as the request's tensors
        return ready

    new = NewRequest(body, workflow, request_id, _form_digest(sent), admitted)
    return await take(gateway, request, new, caller, owner, rate_limiter, idempotency_key)


def _form_digest(sent: EditForm) -> str:
    """What an Idempotency-Key's retry must send again: the fields, the image's and the mask's
    bytes (not the multipart encoding, whose boundary each client draws anew). Named "edit",
    so a generation's body under the same key is another body."""
    files = [hashlib.sha256(data).hexdigest() if data is not None else None for data in (sent.image, sent.mask)]
    return body_hash(json.dumps({"edit": sent.fields.model_dump(mode="json"), "files": files}, sort_keys=True))
