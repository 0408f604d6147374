"""Taking a new request, at most once per `Idempotency-Key`: what `POST /v1/images/generations`
and `POST /v1/images/edits` share before `running.run_admitted` (which they share after).

Why one place: a client that lost its connection retries either route, with the same key and
the same body, on any gateway, and must get the same request, never a second generation. Only
how a route's body becomes a `NewRequest` (JSON, or a multipart form with an image) differs.

The flow: claim the key (`idempotency.IdempotencyKeys`, a KV create across gateways); the first
claim runs the request detached (a caller that goes away does not cancel it); a retry answers
the request the key named (waits for it, wherever it runs); a claim whose request never started
(its gateway died before it got that far) is run here under the id the key names.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse

from services.gateway.admission import Admitted
from services.gateway.answering import answer_from_record
from services.gateway.errors import APIError
from services.gateway.keys.limits import RateLimiter
from services.gateway.keys.model import KeyRecord
from services.gateway.records import record_key
from services.gateway.request_state import Owner
from services.gateway.running import Gateway, run_admitted
from services.gateway.schemas import AsyncAccepted, ImageGenerationRequest, ImageGenerationResponse
from shared.workflows.spec import WorkflowSpec

CLAIM_GRACE_S = 5.0  # a claimed Idempotency-Key whose request has no record by then: its gateway died


@dataclass(frozen=True)
class NewRequest:
    """A POSTed request before it is admitted, as either route hands it over."""

    body: ImageGenerationRequest  # a generation's body (an edit's form becomes one)
    workflow: WorkflowSpec
    request_id: str  # X-Request-Id's, or a new one
    digest: str  # idempotency.body_hash of what the client sent: a retry under its key sends the same
    admit: Callable[[], Awaitable[Admitted]]  # validate and build its params (4xx when bad)


async def take(
    gateway: Gateway,
    request: Request,
    new: NewRequest,
    caller: KeyRecord,
    owner: Owner,
    rate_limiter: RateLimiter,
    idempotency_key: str | None,
) -> ImageGenerationResponse | JSONResponse:
    """Admit and run `new` (rate limit, then `new.admit`, then `run_admitted`); with an
    Idempotency-Key, once: a retry answers the request the key named first (400 for a
    malformed key, 422 for the key with another body)."""
    claims = gateway.idempotency
    body, workflow = new.body, new.workflow
    if idempotency_key is None or claims is None:
        rate_limiter.take(caller)
        admitted = await new.admit()
        return await run_admitted(gateway, request, body, workflow, admitted, new.request_id, caller, owner)
    gateway.drain.refuse_if_draining()
    request_id = new.request_id
    earlier = await claims.claim(owner, idempotency_key, new.digest, request_id)
    if earlier is not None:
        if await _recorded(gateway, record_key(owner.key_id, earlier)):
            return await _answer_again(gateway, body, earlier, owner, workflow.name)
        # The gateway that claimed the key died before it started the request: start it here,
        # under the id the key names. Were that gateway only slow, the record's create decides
        # which of the two runs it (the other answers 409 and follows it): never both.
        request_id = earlier
    try:
        rate_limiter.take(caller)
        admitted = await new.admit()
        return await run_admitted(gateway, request, body, workflow, admitted, request_id, caller, owner, detached=True)
    except APIError as exc:
        if exc.code == "duplicate_request" and earlier is not None:
            return await _answer_again(gateway, body, request_id, owner, workflow.name)
        if gateway.orchestrator.get(request_id, owner) is None:  # it never started: a retry may run it
            await claims.forget(owner, idempotency_key)
        raise
    except Exception:
        # A bus fault (answered 503) before the request started: a retry may run it. If the
        # bus cannot forget the claim either, the retry finds no record and runs it anyway.
        if gateway.orchestrator.get(request_id, owner) is None:
            with contextlib.suppress(Exception):
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
