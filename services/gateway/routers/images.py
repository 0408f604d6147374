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
from services.gateway.answering import answer_from_record
from services.gateway.deps import GatewayDep, OwnerDep, RateLimiterDep, SettingsDep
from services.gateway.errors import APIError
from services.gateway.idempotency import body_hash
from services.gateway.keys.auth import Caller
from services.gateway.keys.limits import check_priority
from services.gateway.loras import bind
from services.gateway.records import record_key
from services.gateway.request_state import Owner
from services.gateway.running import Gateway, run_admitted
from services.gateway.schemas import AsyncAccepted, ErrorResponse, ImageGenerationRequest, ImageGenerationResponse
from shared.settings import Settings
from shared.workflows.catalogue import catalogue
from shared.workflows.spec import WorkflowSpec

router = APIRouter()
CLAIM_GRACE_S = 5.0  # a claimed Idempotency-Key whose request has no record by then: its gateway died
REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
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
    x_request_id: str | None = Header(
        None,
        description="optional id to follow the request's progress: 1-64 letters, digits, '-' or '_' (else 400)",
        json_schema_extra={"pattern": REQUEST_ID.pattern},
    ),
    idempotency_key: str | None = Header(
        None,
        description="retry safely: the same key (with the same body) on any gateway, within 24 h, "
        "answers the request it named first instead of generating again; another body is a 422",
    ),
) -> ImageGenerationResponse | JSONResponse:
    """Generate images. With `wait: false` answer 202 at once; follow the request's
    `events_url` (server-sent events) or poll its `status_url` for the images."""
    workflow = bind(_workflow(body, settings), gateway.loras)  # its LoRAs: the registry's now
    request_id = checked_request_id(x_request_id)
    check_priority(caller, body.priority)
    claims = gateway.idempotency
    if idempotency_key is None or claims is None:
        rate_limiter.take(caller)
        admitted = await asyncio.to_thread(admit, body, workflow, settings.max_image_pixels)
        return await run_admitted(gateway, request, body, workflow, admitted, request_id, caller, owner)
    gateway.drain.refuse_if_draining()
    earlier = await claims.claim(owner, idempotency_key, body_hash(body.model_dump_json()), request_id)
    if earlier is not None:
        if await _recorded(gateway, record_key(owner.key_id, earlier)):
            return await _answer_again(gateway, body, earlier, owner, workflow.name)
        # The gateway that claimed the key died before it started the request: start it here,
        # under the id the key names. Were that gateway only slow, the record's create decides
        # which of the two runs it (the other answers 409 and follows it): never both.
        request_id = earlier
    try:
        rate_limiter.take(caller)
        admitted = await asyncio.to_thread(admit, body, workflow, settings.max_image_pixels)
        return await run_admitted(gateway, request, body, workflow, admitted, request_id, caller, owner, detached=True)
    except APIError as exc:
        if exc.code == "duplicate_request" and earlier is not None:
            return await _answer_again(gateway, body, request_id, owner, workflow.name)
        if gateway.orchestrator.get(request_id, owner) is None:  # it never started: a retry may run it
            await claims.forget(owner, idempotency_key)
        raise


async def _recorded(gateway: Gateway, key: str) -> bool:
    """Whether the request of record `key` was started (by any gateway), waiting up to
    CLAIM_GRACE_S for a gateway that claimed its Idempotency-Key to get that far."""
    store = gateway.orchestrator.store
    if store is None:
        return False
    loop = asyncio.get_running_loop()
    give_up = loop.time() + CLAIM_GRACE_S
    while await store.load(key) is None:
        if loop.time() > give_up:
            return False
        await asyncio.sleep(0.2)
    return True


async def _answer_again(
    gateway: Gateway, body: ImageGenerationRequest, request_id: str, owner: Owner, workflow: str
) -> ImageGenerationResponse | JSONResponse:
    """A retry of an Idempotency-Key: the answer of the request it named (waited for, on
    whichever gateway drives it), or 202 again for `wait: false`."""
    orchestrator = gateway.orchestrator
    key = record_key(owner.key_id, request_id)
    timeout_s = (body.timeout_s or gateway.settings.request_timeout_s) + 5.0
    if body.wait:
        return await answer_from_record(orchestrator, key, timeout_s)
    record = await orchestrator.store.load(key) if orchestrator.store is not None else None
    accepted = AsyncAccepted(
        request_id=request_id,
        status="running",
        seed=record.answer.seed if record is not None else (body.seed or 0),
        workflow=workflow,
        status_url=f"/v1/requests/{request_id}",
        events_url=f"/v1/requests/{request_id}/events",
    )
    return JSONResponse(accepted.model_dump(), status_code=202)


def checked_request_id(x_request_id: str | None) -> str:
    """The client's X-Request-Id (400 unless 1-64 letters, digits, '-' or '_'), else a new id."""
    if x_request_id is not None and not REQUEST_ID.match(x_request_id):
        raise APIError(400, "invalid_request_id", "X-Request-Id must be 1-64 letters, digits, '-' or '_'")
    return x_request_id or uuid.uuid4().hex


def _workflow(body: ImageGenerationRequest, settings: Settings) -> WorkflowSpec:
    """The workflow the body names (or its OpenAI `model` alias, or the server's default); 404 if unknown."""
    name = body.workflow or body.model or settings.default_workflow
    workflow = catalogue().get(name)
    if workflow is None:
        raise APIError(404, "unknown_workflow", f"unknown workflow {name!r}; known: {', '.join(sorted(catalogue()))}")
    return workflow
