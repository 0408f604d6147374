"""The part of taking a request that generations and edits share, once it is admitted: refuse
it if the mesh cannot finish it in time, hold it to its caller's in-flight limit, start it, and
answer it (its images, or 202 at once with `wait: false`).

Why one place: both routes must give the same answers, 429s and links; only how a body becomes
an `Admitted` request differs (JSON, or a multipart form with an image)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse

from services.gateway.admission import Admitted
from services.gateway.answering import InFlight, answer
from services.gateway.draining import Drain
from services.gateway.errors import BUS_FAULTS, APIError
from services.gateway.idempotency import IdempotencyKeys
from services.gateway.image_files import Delivery, ImageFiles
from services.gateway.keys.limits import check_in_flight
from services.gateway.keys.model import KeyRecord
from services.gateway.loras import publish_prefetch, resolve
from services.gateway.orchestrator import Orchestrator, RequestFailed
from services.gateway.overload import LoadView, refuse_if_overloaded
from services.gateway.records import AnswerSpec
from services.gateway.request_state import Owner
from services.gateway.schemas import AsyncAccepted, ImageGenerationRequest, ImageGenerationResponse
from shared import metrics
from shared.bus import Bus
from shared.lora_registry import LoraRegistry
from shared.settings import Settings
from shared.workflows.spec import WorkflowSpec

log = logging.getLogger("lego.gateway")


@dataclass(frozen=True)
class Gateway:
    """What running a request needs of this gateway (the routes' dependencies)."""

    settings: Settings
    orchestrator: Orchestrator
    load_view: LoadView
    in_flight: InFlight
    files: ImageFiles
    loras: LoraRegistry  # the LoRA registry: a request's LoRA names to their files
    drain: Drain  # SIGTERM: refuse new requests while handing the running ones over
    idempotency: IdempotencyKeys | None = None  # Idempotency-Key claims (None: records off)


async def run_admitted(
    gateway: Gateway,
    request: Request,
    body: ImageGenerationRequest,
    workflow: WorkflowSpec,
    admitted: Admitted,
    request_id: str,
    caller: KeyRecord,
    owner: Owner,
    detached: bool = False,
) -> ImageGenerationResponse | JSONResponse:
    """Start `admitted` as `request_id` and answer it; APIError 429 when its models have more
    work queued than its deadline, 409 when a request of that id is running. `detached` (it
    has an Idempotency-Key): a caller that goes away does not cancel it, so its retry finds it
    running or done."""
    gateway.drain.refuse_if_draining()
    timeout_s = body.timeout_s or gateway.settings.request_timeout_s
    prefetch = resolve(workflow, admitted.steps, gateway.loras)
    try:
        coming = gateway.orchestrator.waiting_steps(body.priority)
        await refuse_if_overloaded(gateway.load_view, workflow, timeout_s, body.priority, coming)
    except APIError:
        metrics.request_refused(workflow.name, "overloaded", body.priority)
        raise
    await publish_prefetch(gateway.loras.bus, prefetch)  # the denoisers read the files while the prompt is encoded
    orchestrator = gateway.orchestrator
    check_in_flight(caller, orchestrator.running_for(owner))  # no await from here to create: no race
    try:
        state = orchestrator.create(
            request_id, workflow, admitted.steps, timeout_s=body.timeout_s, owner=owner, priority=body.priority
        )
    except RequestFailed as exc:
        raise APIError(409, exc.error.code, exc.error.message) from exc
    # Links are absolute, on the base URL the client reached this gateway by.
    delivery = Delivery(admitted.response_format, gateway.files, str(request.base_url))
    seed, encoding = admitted.request.seed, admitted.encoding
    spec = AnswerSpec(
        seed=seed,
        format=encoding.format,
        quality=encoding.quality,
        response_format=admitted.response_format,
        base_url=str(request.base_url),
    )
    try:
        await orchestrator.register(state, spec)  # its record and lease: any gateway now answers for it
    except RequestFailed as exc:
        raise APIError(409, exc.error.code, exc.error.message) from exc
    await announce(orchestrator.bus, workflow)
    if body.wait and detached:
        running = gateway.in_flight.keep(answer(orchestrator, state, admitted.tensors, seed, encoding, delivery))
        return await asyncio.shield(running)
    if body.wait:
        return await answer(orchestrator, state, admitted.tensors, seed, encoding, delivery)
    gateway.in_flight.answer(orchestrator, state, admitted.tensors, seed, encoding, delivery)
    accepted = AsyncAccepted(
        request_id=request_id,
        status="running",
        seed=seed,
        workflow=workflow.name,
        status_url=f"/v1/requests/{request_id}",
        events_url=f"/v1/requests/{request_id}/events",
    )
    return JSONResponse(accepted.model_dump(), status_code=202)


async def announce(bus: Bus, workflow: WorkflowSpec) -> None:
    """Tell the autoscaler a request was admitted, with the steps it will publish: it scales a
    model for its step now, not once the stages before it are done. A hint: a failure here costs
    scaling time, never the request."""
    try:
        await bus.publish_admitted([(node.kind.value, node.model) for node in workflow.nodes])
    except BUS_FAULTS as exc:
        log.debug("admission notice not sent: %s", exc)
