"""Following and controlling a request that exists: its status, its server-sent progress events,
and cancel."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from services.gateway import records
from services.gateway.deps import OrchestratorDep, OwnerDep, RequestStateDep
from services.gateway.errors import APIError
from services.gateway.orchestrator import Orchestrator
from services.gateway.records import RequestStore, record_key
from services.gateway.request_state import RequestState, RunStatus
from services.gateway.schemas import ErrorBody, ErrorResponse, ImageData, RequestStatus

router = APIRouter()
HEARTBEAT_S = 15.0  # an SSE comment this often keeps proxies from closing a quiet stream
CANCEL_WAIT_S = 10.0  # a DELETE of a request another gateway drives waits this long for its end


def status_of(orchestrator: Orchestrator, state: RequestState) -> RequestStatus:
    result = state.result or {}
    # Succeeded, but its images are still being pulled and encoded: running until they are in.
    answering = state.status is RunStatus.SUCCEEDED and state.result is None and state.run_id in orchestrator.answers
    return RequestStatus(
        request_id=state.request_id,
        workflow=state.workflow.name,
        status=RunStatus.RUNNING.value if answering else state.status.value,
        nodes=state.nodes.status(state.workflow),
        replicas=state.nodes.replicas,
        compute_s=state.nodes.compute_s,
        wall_s=state.nodes.wall_s,
        step=state.denoising.step,
        total_steps=state.denoising.total,
        queue_position=orchestrator.queue_position(state),
        elapsed_s=round(time.time() - state.created, 3),
        error=ErrorBody(code=state.error.code, message=state.error.message) if state.error else None,
        data=[ImageData(**d) for d in result.get("data", [])],
        seed=result.get("seed"),
    )


@router.get(
    "/v1/requests/{request_id}",
    response_model=RequestStatus,
    response_model_exclude_none=True,  # an image has b64_json or url, as in the answer; no error until one
    responses={404: {"model": ErrorResponse}},
)
async def request_status(request_id: str, state: RequestStateDep, orchestrator: OrchestratorDep) -> RequestStatus:
    """Status, queue position, denoising progress; the images once an async request is done."""
    return status_of(orchestrator, state)


@router.delete(
    "/v1/requests/{request_id}",
    response_model=RequestStatus,
    responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse, "description": "it already ended"}},
)
async def cancel_request(
    request_id: str, state: RequestStateDep, orchestrator: OrchestratorDep, owner: OwnerDep
) -> RequestStatus:
    """Cancel a running request: the denoiser stops within a step, its queued steps are dropped
    and its tensors are freed. A request that already ended answers 409."""
    if not state.running:
        raise APIError(409, "not_running", f"request {request_id!r} already ended ({state.status.value})")
    if not state.handed_over:
        await orchestrator.cancel(request_id, owner)
        return status_of(orchestrator, state)
    # Another gateway drives it: it hears the cancel on the bus and stores the outcome.
    await orchestrator.bus.publish_cancel(state.run_id)
    if orchestrator.store is not None:
        await orchestrator.store.until_ended(record_key(owner.key_id, request_id), CANCEL_WAIT_S)
    ended = await records.view(orchestrator.store, record_key(owner.key_id, request_id))
    return status_of(orchestrator, ended or state)


@router.get(
    "/v1/requests/{request_id}/events",
    responses={200: {"content": {"text/event-stream": {}}}, 404: {"model": ErrorResponse}},
)
async def request_events(request_id: str, state: RequestStateDep, orchestrator: OrchestratorDep) -> StreamingResponse:
    """Server-sent events, from the first: `queued`, `node` (running/done), `progress`
    (denoising step/total), and last `result` (the answer, images included) or `error`."""
    events = _stream(state)
    if state.handed_over and orchestrator.store is not None:  # another gateway drives it
        events = _stream_stored(orchestrator.store, state)
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(event: dict[str, Any]) -> str:
    return f"id: {event.get('seq', 0)}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"


async def _stream_stored(store: RequestStore, state: RequestState) -> AsyncIterator[str]:
    """The events of a request another gateway drives, from the event stream (its end from the
    record, when the stream no longer has it)."""
    if not state.running:
        if state.result is not None:
            yield _sse({"type": "result", **state.result})
        elif state.error is not None:
            yield _sse({"type": "error", "code": state.error.code, "message": state.error.message})
        return
    async for event in store.follow_events(state.run_id, idle_s=HEARTBEAT_S):
        if event is None:
            yield ": still running\n\n"
            continue
        yield _sse(event)
        if event["type"] in ("result", "error"):
            return


async def _stream(state: RequestState) -> AsyncIterator[str]:
    """Every event of `state`, from the first, until its `result` or `error`; a comment every
    HEARTBEAT_S while nothing happens."""
    log, sent = state.log, 0
    while True:
        changed = log.changed
        while sent < len(log.events):
            event = log.events[sent]
            sent += 1
            yield _sse(event)
            if event["type"] in ("result", "error"):
                return
        try:
            await asyncio.wait_for(changed.wait(), timeout=HEARTBEAT_S)
        except TimeoutError:
            yield ": still running\n\n"
