"""The gateway's FastAPI app: validates requests, hands them to the orchestrator, returns PNGs.

No torch here: the gateway moves references and numbers; the one tensor it touches (the
decoded image, uint8) arrives through the tensor plane as raw bytes. The routes live in
`routers/`, one module per job; what they need comes from `app.state` through `deps`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.gateway.answering import InFlight
from services.gateway.errors import install_error_handlers
from services.gateway.orchestrator import Orchestrator
from services.gateway.overload import LoadView
from services.gateway.routers import health, images, models, requests, status
from shared import metrics, tracing
from shared.bus import Bus
from shared.presence import ensure_buckets
from shared.settings import Settings
from shared.tensor_plane import TensorPlane


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Connect to the mesh for the app's life: the bus, the tensor plane, the orchestrator."""
    settings: Settings = app.state.settings
    tracing.setup("gateway")  # on only where OTEL_* asks for it
    bus = Bus(settings, name=settings.gateway_id)
    await bus.connect()
    await bus.ensure_streams()
    await ensure_buckets(bus)  # presence, autoscaler status: made here so model services need not
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


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="LegoDiffusion gateway",
        version="0.1.0",
        description="Text-to-image workflows served as a mesh of per-model services.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.in_flight = InFlight()  # async requests being answered
    install_error_handlers(app)
    for router in (status, health, models, images, requests):
        app.include_router(router.router)
    return app
