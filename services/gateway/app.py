"""The gateway's FastAPI app: validates requests, hands them to the orchestrator, returns PNGs.

No torch here: the gateway moves references and numbers; the one tensor it touches (the
decoded image, uint8) arrives through the tensor plane as raw bytes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response

from services.gateway import status as status_api
from services.gateway.admission import admit
from services.gateway.errors import APIError, install_error_handlers
from services.gateway.images import ImageEncoding
from services.gateway.orchestrator import Orchestrator, RequestFailed, RequestState
from services.gateway.overload import LoadView, refuse_if_overloaded
from services.gateway.requests_api import answer, router
from services.gateway.schemas import (
    AsyncAccepted,
    ErrorResponse,
    ImageGenerationRequest,
    ImageGenerationResponse,
    LoraInput,
    ModelInfo,
    ModelList,
    NodeInfo,
    ReplicaSummary,
    WorkflowInfo,
    WorkflowList,
)
from shared import metrics, tracing
from shared.bus import Bus
from shared.messages import ReplicaInfo
from shared.presence import live_replicas
from shared.settings import Settings
from shared.tensor_plane import RawTensor, TensorPlane
from shared.workflows.catalogue import catalogue
from shared.zoo.registry import MODELS

log = logging.getLogger("lego.gateway")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 409, 422, 429, 502, 504)}


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tracing.setup("gateway")  # on only where OTEL_* asks for it
        bus = Bus(settings, name=settings.gateway_id)
        await bus.connect()
        await bus.ensure_streams()
        plane = TensorPlane(settings)
        await plane.start()
        metrics.watch_plane(plane)
        orchestrator = Orchestrator(bus, plane, settings)
        await orchestrator.start()
        app.state.bus, app.state.orchestrator = bus, orchestrator
        app.state.load_view = LoadView(bus)
        yield
        await bus.close()
        await plane.close()
        tracing.shutdown()  # send the spans still batched

    app = FastAPI(
        title="LegoDiffusion gateway",
        version="0.1.0",
        description="Text-to-image workflows served as a mesh of per-model services.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(status_api.router)  # GET /v1/status: replicas, backlogs, the autoscaler's view

    def get_settings(request: Request) -> Settings:
        return request.app.state.settings

    def get_orchestrator(request: Request) -> Orchestrator:
        return request.app.state.orchestrator

    def get_load_view(request: Request) -> LoadView:
        return request.app.state.load_view

    def get_bus(request: Request) -> Bus:
        return request.app.state.bus

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics(request: Request) -> Response:
        """Prometheus metrics of this gateway (requests by workflow and status, latency, bytes moved)."""
        body, content_type = metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    @app.get("/readyz", responses={503: {"description": "a model of the workflow(s) has no live replica"}})
    async def readyz(
        workflow: str | None = Query(None, description="a workflow name, or 'all'; default: the default workflow"),
        settings: Settings = Depends(get_settings),
        bus: Bus = Depends(get_bus),
    ) -> JSONResponse:
        name = workflow or settings.default_workflow
        if name != "all" and name not in catalogue():
            raise APIError(404, "unknown_workflow", f"unknown workflow {name!r}; known: all, {', '.join(catalogue())}")
        wanted = list(catalogue().values()) if name == "all" else [catalogue()[name]]
        live = {(str(r.kind), r.model_id) for r in await live_replicas(bus)}
        missing = sorted(
            {f"{kind}/{model}" for w in wanted for kind, model in w.models() if (str(kind), model) not in live}
        )
        if missing:
            return JSONResponse({"status": "not_ready", "workflow": name, "missing": missing}, status_code=503)
        return JSONResponse({"status": "ready", "workflow": name})

    @app.get("/v1/models", response_model=ModelList)
    async def models(bus: Bus = Depends(get_bus)) -> ModelList:
        """Every model with a live replica, which replicas hold it, and the workflows using it."""
        by_model: dict[str, dict[str, ReplicaInfo]] = {}
        kinds: dict[str, set[str]] = {}
        for r in await live_replicas(bus):
            by_model.setdefault(r.model_id, {})[r.replica_id] = r  # a replica announces once per step kind
            kinds.setdefault(r.model_id, set()).add(str(r.kind))
        out = []
        for model_id, replicas in sorted(by_model.items()):
            info = MODELS.get(model_id)
            out.append(
                ModelInfo(
                    model_id=model_id,
                    kinds=sorted(kinds[model_id]),
                    role=info.role if info else "unknown",
                    service=info.service if info else "unknown",
                    description=info.description if info else "",
                    replicas=[
                        ReplicaSummary(
                            replica_id=r.replica_id,
                            host=r.host,
                            pid=r.pid,
                            device=r.device,
                            busy=r.busy,
                            steps_done=r.steps_done,
                            param_bytes=r.param_bytes,
                            metrics_url=r.metrics_url,
                            tensors_held=r.tensors_held,
                            loras=r.loras,
                            batch_size=r.batch_size,
                        )
                        for _, r in sorted(replicas.items())
                    ],
                    workflows=[w.name for w in catalogue().values() if model_id in {m for _, m in w.models()}],
                )
            )
        return ModelList(models=out)

    @app.get("/v1/workflows", response_model=WorkflowList)
    async def workflows(settings: Settings = Depends(get_settings)) -> WorkflowList:
        return WorkflowList(
            default=settings.default_workflow,
            workflows=[
                WorkflowInfo(
                    name=w.name,
                    description=w.description,
                    family=w.family,
                    models=[m for _, m in w.models()],
                    nodes=[NodeInfo(id=n.id, kind=str(n.kind), model=n.model, inputs=n.inputs) for n in w.nodes],
                    controlnets=w.controlnets,
                    loras=w.loras,
                    default_loras=[LoraInput(name=x.name, scale=x.scale) for x in w.default_loras],
                )
                for w in catalogue().values()
            ],
        )

    background: set[asyncio.Task[None]] = set()  # async requests in flight (a reference keeps them alive)

    @app.post(
        "/v1/images/generations",
        response_model=ImageGenerationResponse,
        responses={**ERRORS, 202: {"model": AsyncAccepted, "description": "accepted (`wait: false`)"}},
    )
    async def generate(
        body: ImageGenerationRequest,
        x_request_id: str | None = Header(None, description="optional id to follow the request's progress"),
        settings: Settings = Depends(get_settings),
        orchestrator: Orchestrator = Depends(get_orchestrator),
        load_view: LoadView = Depends(get_load_view),
    ) -> ImageGenerationResponse | JSONResponse:
        """Generate images. With `wait: false` answer 202 at once; follow the request's
        `events_url` (server-sent events) or poll its `status_url` for the images."""
        name = body.workflow or body.model or settings.default_workflow
        workflow = catalogue().get(name)
        if workflow is None:
            raise APIError(
                404, "unknown_workflow", f"unknown workflow {name!r}; known: {', '.join(sorted(catalogue()))}"
            )
        if x_request_id is not None and not _REQUEST_ID.match(x_request_id):
            raise APIError(400, "invalid_request_id", "X-Request-Id must be 1-64 letters, digits, '-' or '_'")
        request_id = x_request_id or uuid.uuid4().hex
        admitted = await asyncio.to_thread(admit, body, workflow)
        try:
            await refuse_if_overloaded(load_view, workflow, body.timeout_s or settings.request_timeout_s)
        except APIError:
            metrics.request_refused(workflow.name, "overloaded")
            raise
        try:
            state = orchestrator.create(request_id, workflow, admitted.params, timeout_s=body.timeout_s)
        except RequestFailed as exc:
            raise APIError(409, exc.error.code, exc.error.message) from exc
        if body.wait:
            return await answer(orchestrator, state, admitted.tensors, admitted.seed, admitted.encoding)
        task = asyncio.create_task(
            _answer_in_background(orchestrator, state, admitted.tensors, admitted.seed, admitted.encoding)
        )
        background.add(task)
        task.add_done_callback(background.discard)
        return JSONResponse(
            AsyncAccepted(
                request_id=request_id,
                status="running",
                seed=admitted.seed,
                workflow=workflow.name,
                status_url=f"/v1/requests/{request_id}",
                events_url=f"/v1/requests/{request_id}/events",
            ).model_dump(),
            status_code=202,
        )

    app.include_router(router)
    return app


async def _answer_in_background(
    orchestrator: Orchestrator, state: RequestState, tensors: dict[str, RawTensor], seed: int, encoding: ImageEncoding
) -> None:
    """An async request's run: its outcome is kept on the request (status, events), not returned."""
    try:
        await answer(orchestrator, state, tensors, seed, encoding)
    except APIError:
        pass  # the failure is on the request already (status + `error` event)
    except Exception:
        log.exception("async request %s failed unexpectedly", state.request_id)
