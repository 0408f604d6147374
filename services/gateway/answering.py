"""The one path (sync or async) from a created request to its answer: run it, encode its images,
keep the answer on the request for async callers and stream it as the final `result` event.

Why separate from the routes: the generation endpoint admits a request and either awaits this
path or hands it to `InFlight`; everything the answer is made of lives here once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from services.gateway.encoding import ImageEncoding, encode_images
from services.gateway.errors import APIError
from services.gateway.image_files import INLINE, Delivery
from services.gateway.orchestrator import HandedOver, Orchestrator, RequestFailed
from services.gateway.records import RequestRecord, record_key
from services.gateway.request_state import RequestState, RunStatus
from services.gateway.schemas import ImageGenerationResponse
from shared import metrics, tracing
from shared.tensor_plane import RawTensor

log = logging.getLogger("lego.gateway")
KEEP_RESULTS = 64  # finished requests whose images stay fetchable (GET /v1/requests/{id})
STATUS_OF_ERROR = {"duplicate_request": 409, "bad_step_input": 422, "cancelled": 409}


async def answer(
    orchestrator: Orchestrator,
    state: RequestState,
    tensors: dict[str, RawTensor],
    seed: int,
    encoding: ImageEncoding = ImageEncoding(),
    delivery: Delivery = INLINE,
    adopted: bool = False,
) -> ImageGenerationResponse:
    """Run a created (or adopted) request to its answer (or raise APIError); the answer is kept on the
    request for async callers and streamed as its final `result` event. Its images come inline
    or as links, as `delivery` says (the same for async callers: the status and the event hold
    the links).

    A deadline that passes is a 504 (`deadline_exceeded`), whether the client set it or the
    server did: the gateway asked its upstream services and did not get their answer in time,
    which is what 504 means. A 4xx would say the request was wrong, and it was not: any
    timeout_s the schema accepts (1 s and up) can be met by a mesh with capacity, and a request
    that surely cannot be met is refused before it starts with 429 (overload). Which deadline
    passed, and where the request was, is in the message.

    However it ends, its record is stored; handed to another gateway (this one drains), the
    answer is the one that gateway stores."""
    try:
        return await _answer(orchestrator, state, tensors, seed, encoding, delivery, adopted)
    except HandedOver:
        return await _answer_handed_over(orchestrator, state)
    finally:
        # Its record is taken before its images may be dropped here (the record keeps them).
        await orchestrator.save_end(state)
        forget_old_results(orchestrator)


async def _answer_handed_over(orchestrator: Orchestrator, state: RequestState) -> ImageGenerationResponse:
    """This gateway drains: the answer the adopter stores, if it comes within the drain's grace;
    else 503 (retryable: the caller sends it again, with its Idempotency-Key, to another gateway)."""
    key = record_key(state.owner.key_id, state.request_id)
    grace = min(state.deadline - time.time() + 5.0, orchestrator.settings.drain_grace_s)
    try:
        return await answer_from_record(orchestrator, key, grace)
    except APIError as exc:
        if exc.code != "deadline_exceeded" or time.time() >= state.deadline:
            raise
        raise APIError(
            503,
            "draining",
            "this gateway shut down before the request finished (another gateway finishes it): send it again "
            "with the same Idempotency-Key to get its answer, or follow it with GET /v1/requests/{id}",
            headers={"Retry-After": "1"},
        ) from exc


async def answer_from_record(orchestrator: Orchestrator, key: str, timeout_s: float) -> ImageGenerationResponse:
    """The answer of a request another gateway drives (or drove): waits until its record says it
    ended, then answers as that gateway did (its images, or its error's status)."""
    if orchestrator.store is None:
        raise APIError(502, "handed_over", "the request moved to another gateway")
    record = await orchestrator.store.until_ended(key, max(1.0, timeout_s))
    return response_of(record)


def response_of(record: RequestRecord | None) -> ImageGenerationResponse:
    """A finished record's answer body, or its error as an APIError."""
    if record is None or record.running:
        raise APIError(504, "deadline_exceeded", "the request did not finish in time on the gateway driving it")
    if record.status == RunStatus.SUCCEEDED.value and record.result is not None:
        if record.result.get("images_dropped"):
            raise APIError(
                410,
                "images_dropped",
                f"request {record.request_id} succeeded, but its images were over the bus's message limit "
                "and went only to the connection that asked first",
            )
        return ImageGenerationResponse.model_validate(record.result)
    error = record.error
    if error is None:
        raise APIError(502, "result_unavailable", f"request {record.request_id} {record.status} without its images")
    status = 504 if error.code == "deadline_exceeded" else STATUS_OF_ERROR.get(error.code, 502)
    raise APIError(status, error.code, error.message)


async def _answer(
    orchestrator: Orchestrator,
    state: RequestState,
    tensors: dict[str, RawTensor],
    seed: int,
    encoding: ImageEncoding,
    delivery: Delivery,
    adopted: bool,
) -> ImageGenerationResponse:
    try:
        images = await orchestrator.execute(state, tensors, adopted)
    except TimeoutError:
        error = state.error
        message = error.message if error is not None else "the request did not finish in time"
        raise APIError(504, "deadline_exceeded", message)  # noqa: B904 - the timeout itself is the whole story
    except RequestFailed as exc:
        raise APIError(STATUS_OF_ERROR.get(exc.error.code, 502), exc.error.code, exc.error.message) from exc
    attributes = {"lego.images": images.shape[0] if images.shape else 0, "lego.format": encoding.format}
    with tracing.span("images.encode", attributes, state.trace.context):
        encoded = await asyncio.to_thread(encode_images, images, encoding)
        data = delivery.data(encoded, encoding.format)
    _, height, width, _ = images.shape  # (n, H, W, 3): encode_images refused any other
    response = ImageGenerationResponse(
        created=int(time.time()),
        data=data,
        output_format=encoding.format,
        size=f"{width}x{height}",
        request_id=state.request_id,
        seed=seed,
        workflow=state.workflow.name,
    )
    if state.owner.name:
        metrics.key_images(state.owner.name, len(data))
    state.result = response.model_dump(exclude_none=True)
    state.log.emit({"type": "result", **state.result})
    return response


def forget_old_results(orchestrator: Orchestrator) -> None:
    """Drop the images of all but the newest finished requests, from the status and from the
    final event alike (both hold them), so finished requests cost no more than their record."""
    with_results = [s for s in orchestrator.requests.values() if s.result is not None]
    for old in with_results[:-KEEP_RESULTS]:
        old.result = None
        events = old.log.events
        if events and events[-1]["type"] == "result":
            events[-1] = {**events[-1], "data": [], "images_dropped": True}


class InFlight:
    """Async requests being answered (`wait: false`). A task the event loop alone refers to may
    be collected mid-run, so each is held here until it ends."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def keep(self, coro: Coroutine[Any, Any, ImageGenerationResponse]) -> asyncio.Task[ImageGenerationResponse]:
        """Run a synchronous request's answer as a task of its own, held until it ends: its
        caller may go away (and retry with its Idempotency-Key) without cancelling it."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(_settled)
        task.add_done_callback(self._tasks.discard)
        return task

    async def wait(self, timeout_s: float) -> None:
        """Until every answer in flight ended (a draining gateway's last stores), or `timeout_s`."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    def answer(
        self,
        orchestrator: Orchestrator,
        state: RequestState,
        tensors: dict[str, RawTensor],
        seed: int,
        encoding: ImageEncoding,
        delivery: Delivery = INLINE,
        adopted: bool = False,
    ) -> None:
        """`answer` in the background: the outcome is kept on the request (status, events)."""
        task = asyncio.create_task(
            _answer_in_background(orchestrator, state, tensors, seed, encoding, delivery, adopted)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _settled(task: asyncio.Task[ImageGenerationResponse]) -> None:
    """Read a kept task's outcome, so one whose caller went away logs no 'never retrieved'."""
    if not task.cancelled():
        task.exception()


async def _answer_in_background(
    orchestrator: Orchestrator,
    state: RequestState,
    tensors: dict[str, RawTensor],
    seed: int,
    encoding: ImageEncoding,
    delivery: Delivery,
    adopted: bool,
) -> None:
    """An async request's run: its outcome is kept on the request (status, events), not returned."""
    try:
        await answer(orchestrator, state, tensors, seed, encoding, delivery, adopted)
    except APIError:
        pass  # the failure is on the request already (status + `error` event)
    except Exception:
        log.exception("async request %s failed unexpectedly", state.request_id)
