"""Following and controlling requests: status, server-sent progress events, cancel, and the
one path (sync or async) from a created request to its answer.

Why separate from `app.py`: the generation endpoint admits a request; everything after that
— waiting for it, streaming its events, cancelling it — is about a request that exists.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from services.gateway.errors import APIError
from services.gateway.images import ImageEncoding, encode_images
from services.gateway.orchestrator import Orchestrator, RequestFailed, RequestState
from services.gateway.schemas import ErrorBody, ErrorResponse, ImageData, ImageGenerationResponse, RequestStatus
from shared import tracing
from shared.tensor_plane import RawTensor

router = APIRouter()
KEEP_RESULTS = 64  # finished requests whose images stay fetchable (GET /v1/requests/{id})
HEARTBEAT_S = 15.0  # an SSE comment this often keeps proxies from closing a quiet stream
STATUS_OF_ERROR = {"duplicate_request": 409, "bad_step_input": 422, "cancelled": 409}


def _orchestrator(request: Request) -> Orchestrator:
    return request.app.state.orchestrator


def _state(request: Request, request_id: str) -> RequestState:
    state = _orchestrator(request).get(request_id)
    if state is None:
        raise APIError(404, "unknown_request", f"no request {request_id!r} on this gateway")
    return state


async def answer(
    orchestrator: Orchestrator,
    state: RequestState,
    tensors: dict[str, RawTensor],
    seed: int,
    encoding: ImageEncoding = ImageEncoding(),
) -> ImageGenerationResponse:
    """Run a created request to its answer (or raise APIError); the answer is kept on the
    request for async callers and streamed as its final `result` event."""
    try:
        images = await orchestrator.execute(state, tensors)
    except TimeoutError:
        raise APIError(  # noqa: B904 - the timeout itself is the whole story
            504, "deadline_exceeded", "the request did not finish in time; is every service running?"
        )
    except RequestFailed as exc:
        raise APIError(STATUS_OF_ERROR.get(exc.error.code, 502), exc.error.code, exc.error.message) from exc
    attributes = {"lego.images": images.shape[0] if images.shape else 0, "lego.format": encoding.format}
    with tracing.span("images.encode", attributes, state.trace.context):
        encoded = await asyncio.to_thread(encode_images, images, encoding)
        data = [ImageData(b64_json=base64.b64encode(e).decode()) for e in encoded]
    response = ImageGenerationResponse(
        created=int(time.time()),
        data=data,
        output_format=encoding.format,
        request_id=state.request_id,
        seed=seed,
        workflow=state.workflow.name,
    )
    state.result = response.model_dump()
    state.emit({"type": "result", **state.result})
    _forget_old_results(orchestrator)
    return response


def _forget_old_results(orchestrator: Orchestrator) -> None:
    """Drop the images of all but the newest finished requests, from the status and from the
    final event alike (both hold them), so finished requests cost no more than their record."""
    with_results = [s for s in orchestrator.requests.values() if s.result is not None]
    for old in with_results[:-KEEP_RESULTS]:
        old.result = None
        if old.events and old.events[-1]["type"] == "result":
            old.events[-1] = {**old.events[-1], "data": [], "images_dropped": True}


def status_of(orchestrator: Orchestrator, state: RequestState) -> RequestStatus:
    result = state.result or {}
    return RequestStatus(
        request_id=state.request_id,
        workflow=state.workflow.name,
        status=state.status,
        nodes=state.node_status(),
        replicas=state.replicas,
        compute_s=state.compute_s,
        wall_s=state.wall_s,
        step=state.step,
        total_steps=state.total_steps,
        queue_position=orchestrator.queue_position(state),
        elapsed_s=round(time.time() - state.created, 3),
        error=ErrorBody(code=state.error.code, message=state.error.message) if state.error else None,
        data=[ImageData(**d) for d in result.get("data", [])],
        seed=result.get("seed"),
    )


@router.get("/v1/requests/{request_id}", response_model=RequestStatus, responses={404: {"model": ErrorResponse}})
async def request_status(request_id: str, request: Request) -> RequestStatus:
    """Status, queue position, denoising progress; the images once an async request is done."""
    return status_of(_orchestrator(request), _state(request, request_id))


@router.delete(
    "/v1/requests/{request_id}", response_model=RequestStatus, responses={404: {"model": ErrorResponse}, 409: {}}
)
async def cancel_request(request_id: str, request: Request) -> RequestStatus:
    """Cancel a running request: the denoiser stops within a step, its queued steps are dropped
    and its tensors are freed. A request that already ended answers 409."""
    orchestrator = _orchestrator(request)
    state = _state(request, request_id)
    if state.status != "running":
        raise APIError(409, "not_running", f"request {request_id!r} already ended ({state.status})")
    await orchestrator.cancel(request_id)
    return status_of(orchestrator, state)


@router.get(
    "/v1/requests/{request_id}/events",
    responses={200: {"content": {"text/event-stream": {}}}, 404: {"model": ErrorResponse}},
)
async def request_events(request_id: str, request: Request) -> StreamingResponse:
    """Server-sent events, from the first: `queued`, `node` (running/done), `progress`
    (denoising step/total), and last `result` (the answer, images included) or `error`."""
    state = _state(request, request_id)

    async def stream() -> AsyncIterator[str]:
        sent = 0
        while True:
            changed = state.changed
            while sent < len(state.events):
                event = state.events[sent]
                sent += 1
                yield f"id: {event['seq']}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"
                if event["type"] in ("result", "error"):
                    return
            try:
                await asyncio.wait_for(changed.wait(), timeout=HEARTBEAT_S)
            except TimeoutError:
                yield ": still running\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
