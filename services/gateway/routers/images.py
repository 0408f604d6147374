"""`POST /v1/images/generations`: admit a request, refuse it if the mesh cannot finish it in time,
then answer it (or, with `wait: false`, answer 202 and let `InFlight` run it)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from services.gateway.admission import Admitted, admit
from services.gateway.deps import GatewayDep, OwnerDep, RateLimiterDep, SettingsDep
from services.gateway.errors import APIError
from services.gateway.headers import IdempotencyKeyHeader, RequestIdDep
from services.gateway.idempotency import body_hash
from services.gateway.keys.auth import Caller
from services.gateway.keys.limits import check_priority
from services.gateway.loras import bind
from services.gateway.schemas import AsyncAccepted, ErrorResponse, ImageGenerationRequest, ImageGenerationResponse
from services.gateway.taking import NewRequest, take
from shared.settings import Settings
from shared.workflows.catalogue import catalogue
from shared.workflows.spec import WorkflowSpec

router = APIRouter()
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorResponse,
        "description": "malformed request, or an OpenAI field's value these models cannot honour "
        "(unsupported_value, e.g. background 'transparent'; the message names the field)",
    },
    404: {"model": ErrorResponse, "description": "unknown workflow"},
    413: {"model": ErrorResponse, "description": "body over the limit, or a control image of too many pixels"},
    409: {"model": ErrorResponse, "description": "a request with this X-Request-Id is running"},
    422: {
        "model": ErrorResponse,
        "description": "this Idempotency-Key named a request with another body (idempotency_key_reused)",
    },
    503: {"model": ErrorResponse, "description": "this gateway is draining (Retry-After): send it to another"},
    429: {"model": ErrorResponse, "description": "its models have more work queued than its deadline (Retry-After)"},
    502: {"model": ErrorResponse, "description": "a service failed the request"},
    504: {"model": ErrorResponse, "description": "its deadline passed before it finished (deadline_exceeded)"},
}


@router.post(
    "/v1/images/generations",
    response_model=ImageGenerationResponse,
    response_model_exclude_none=True,  # an image has b64_json or url, not a null other
    responses={**ERRORS, 202: {"model": AsyncAccepted, "description": "accepted (`wait: false`)"}},
)
async def generate(
    request: Request,
    body: ImageGenerationRequest,
    settings: SettingsDep,
    gateway: GatewayDep,
    caller: Caller,
    owner: OwnerDep,
    rate_limiter: RateLimiterDep,
    request_id: RequestIdDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> ImageGenerationResponse | JSONResponse:
    """Generate images. With `wait: false` answer 202 at once; follow the request's
    `events_url` (server-sent events) or poll its `status_url` for the images."""
    workflow = bind(_workflow(body, settings), gateway.loras)  # its LoRAs: the registry's now
    check_priority(caller, body.priority)

    async def admitted() -> Admitted:
        return await asyncio.to_thread(admit, body, workflow, settings.max_image_pixels)

    new = NewRequest(body, workflow, request_id, body_hash(body.model_dump_json()), admitted)
    return await take(gateway, request, new, caller, owner, rate_limiter, idempotency_key)


def _workflow(body: ImageGenerationRequest, settings: Settings) -> WorkflowSpec:
    """The workflow the body names (or its OpenAI `model` alias, or the server's default); 404 if unknown."""
    name = body.workflow or body.model or settings.default_workflow
    workflow = catalogue().get(name)
    if workflow is None:
        raise APIError(404, "unknown_workflow", f"unknown workflow {name!r}; known: {', '.join(sorted(catalogue()))}")
    return workflow
