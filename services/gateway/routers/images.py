"""`POST /v1/images/generations`: admit a request, refuse it if the mesh cannot finish it in time,
then answer it (or, with `wait: false`, answer 202 and let `InFlight` run it)."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from services.gateway.admission import admit
from services.gateway.answering import answer
from services.gateway.deps import (
    ImageFilesDep,
    InFlightDep,
    LoadViewDep,
    OrchestratorDep,
    OwnerDep,
    RateLimiterDep,
    SettingsDep,
)
from services.gateway.errors import APIError
from services.gateway.image_files import Delivery
from services.gateway.keys.auth import Caller
from services.gateway.keys.limits import check_in_flight, check_priority
from services.gateway.orchestrator import RequestFailed
from services.gateway.overload import refuse_if_overloaded
from services.gateway.schemas import AsyncAccepted, ErrorResponse, ImageGenerationRequest, ImageGenerationResponse
from shared import metrics
from shared.settings import Settings
from shared.workflows.catalogue import catalogue
from shared.workflows.spec import WorkflowSpec

router = APIRouter()
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorResponse,
        "description": "malformed request, or an OpenAI field's value these models cannot honour "
        "(unsupported_value, e.g. background 'transparent'; the message names the field)",
    },
    404: {"model": ErrorResponse, "description": "unknown workflow"},
    413: {"model": ErrorResponse, "description": "body over the limit, or a control image of too many pixels"},
    409: {"model": ErrorResponse, "description": "a request with this X-Request-Id is running"},
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
    orchestrator: OrchestratorDep,
    load_view: LoadViewDep,
    in_flight: InFlightDep,
    caller: Caller,
    owner: OwnerDep,
    rate_limiter: RateLimiterDep,
    files: ImageFilesDep,
    x_request_id: str | None = Header(
        None,
        description="optional id to follow the request's progress: 1-64 letters, digits, '-' or '_' (else 400)",
        json_schema_extra={"pattern": _REQUEST_ID.pattern},
    ),
) -> ImageGenerationResponse | JSONResponse:
    """Generate images. With `wait: false` answer 202 at once; follow the request's
    `events_url` (server-sent events) or poll its `status_url` for the images."""
    workflow = _workflow(body, settings)
    if x_request_id is not None and not _REQUEST_ID.match(x_request_id):
        raise APIError(400, "invalid_request_id", "X-Request-Id must be 1-64 letters, digits, '-' or '_'")
    request_id = x_request_id or uuid.uuid4().hex
    check_priority(caller, body.priority)
    rate_limiter.take(caller)
    admitted = await asyncio.to_thread(admit, body, workflow, settings.max_image_pixels)
    try:
        await refuse_if_overloaded(load_view, workflow, body.timeout_s or settings.request_timeout_s, body.priority)
    except APIError:
        metrics.request_refused(workflow.name, "overloaded", body.priority)
        raise
    check_in_flight(caller, orchestrator.running_for(owner))  # no await from here to create: no race
    try:
        state = orchestrator.create(
            request_id, workflow, admitted.steps, timeout_s=body.timeout_s, owner=owner, priority=body.priority
        )
    except RequestFailed as exc:
        raise APIError(409, exc.error.code, exc.error.message) from exc
    # Links are absolute, on the base URL the client reached this gateway by.
    delivery = Delivery(admitted.response_format, files, str(request.base_url))
    if body.wait:
        return await answer(orchestrator, state, admitted.tensors, admitted.request.seed, admitted.encoding, delivery)
    in_flight.answer(orchestrator, state, admitted.tensors, admitted.request.seed, admitted.encoding, delivery)
    accepted = AsyncAccepted(
        request_id=request_id,
        status="running",
        seed=admitted.request.seed,
        workflow=workflow.name,
        status_url=f"/v1/requests/{request_id}",
        events_url=f"/v1/requests/{request_id}/events",
    )
    return JSONResponse(accepted.model_dump(), status_code=202)


def _workflow(body: ImageGenerationRequest, settings: Settings) -> WorkflowSpec:
    """The workflow the body names (or its OpenAI `model` alias, or the server's default); 404 if unknown."""
    name = body.workflow or body.model or settings.default_workflow
    workflow = catalogue().get(name)
    if workflow is None:
        raise APIError(404, "unknown_workflow", f"unknown workflow {name!r}; known: {', '.join(sorted(catalogue()))}")
    return workflow
