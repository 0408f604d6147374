"""Is the gateway up, can it serve a workflow, and its Prometheus metrics: what probes and
scrapers read."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from services.gateway.deps import BusDep, SettingsDep
from services.gateway.errors import APIError
from services.gateway.schemas import ErrorResponse
from shared import metrics
from shared.presence import live_replicas
from shared.workflows.catalogue import catalogue

router = APIRouter()


@router.get("/healthz", responses={503: {"description": "draining (SIGTERM): route requests elsewhere"}})
async def healthz(request: Request) -> JSONResponse:
    """Up (200 ok), or draining after SIGTERM (503 draining): what a balancer health-checks."""
    if request.app.state.drain.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request) -> Response:
    """Prometheus metrics of this gateway (requests by workflow and status, latency, bytes moved)."""
    body, content_type = metrics.render(request.headers.get("accept"))
    return Response(body, media_type=content_type)


@router.get(
    "/readyz",
    responses={
        404: {"model": ErrorResponse, "description": "unknown workflow"},
        503: {"description": "a model of the workflow(s) has no live replica"},
    },
)
async def readyz(
    request: Request,
    settings: SettingsDep,
    bus: BusDep,
    workflow: str | None = Query(None, description="a workflow name, or 'all'; default: the default workflow"),
) -> JSONResponse:
    name = workflow or settings.default_workflow
    if request.app.state.drain.draining:
        return JSONResponse({"status": "draining", "workflow": name}, status_code=503)
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
