"""The gateway's FastAPI app: validates requests, hands them to the orchestrator, returns PNGs.

No torch here: the gateway moves references and numbers; the one tensor it touches (the
decoded image, uint8) arrives through the tensor plane as raw bytes. The routes live in
`routers/`, one module per job; what they need comes from `app.state` through `deps`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from services.gateway.answering import InFlight
from services.gateway.draining import Drain
from services.gateway.encoding import ImageEncoding
from services.gateway.errors import install_error_handlers
from services.gateway.idempotency import IdempotencyKeys
from services.gateway.image_files import Delivery, ImageFiles
from services.gateway.keys.auth import guard
from services.gateway.keys.bootstrap import ensure_admin_key
from services.gateway.keys.gate import AuthenticateFirst
from services.gateway.keys.limits import RateLimiter
from services.gateway.keys.model import Scope
from services.gateway.keys.store import KeyStore
from services.gateway.leases import Leases
from services.gateway.limits import BodyLimits
from services.gateway.openapi import COMMON_ERRORS, install_openapi
from services.gateway.orchestrator import Orchestrator
from services.gateway.overload import LoadView
from services.gateway.records import RequestStore
from services.gateway.routers import edits, files, health, images, keys, loras, models, requests, status
from shared import metrics, tracing
from shared.bus import Bus
from shared.lora_registry import LoraRegistry
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
    store = RequestStore(bus)
    await store.start()
    app.state.idempotency = IdempotencyKeys(bus)
    await app.state.idempotency.start()
    leases = Leases(bus, lambda dead, keys: adopt(app, dead, keys), lambda: app.state.orchestrator.let_go_of_taken())
    orchestrator = Orchestrator(bus, plane, settings, store, leases)
    await orchestrator.start()
    app.state.bus, app.state.orchestrator = bus, orchestrator
    app.state.load_view = LoadView(bus)
    app.state.keys = KeyStore(bus)
    await app.state.keys.start()
    await ensure_admin_key(app.state.keys, settings)
    app.state.loras = LoraRegistry(bus)
    await app.state.loras.start(seed_builtins=True)
    app.state.drain.install(lambda: hand_over(app))
    await leases.start()  # last: adopting needs everything above
    yield
    await leases.close()
    await store.close()
    await app.state.loras.close()
    await app.state.keys.close()
    await bus.close()
    await plane.close()
    tracing.shutdown()  # send the spans still batched


async def adopt(app: FastAPI, dead: str, keys: list[str]) -> None:
    """Finish the running requests of a dead gateway (leases.py found them; now ours)."""
    state = app.state
    if state.drain.draining:
        return
    for request, spec in await state.orchestrator.adopt(dead, keys):
        delivery = Delivery(spec.response_format, state.image_files, spec.base_url)
        encoding = ImageEncoding(format=spec.format, quality=spec.quality)
        state.in_flight.answer(state.orchestrator, request, {}, spec.seed, encoding, delivery, adopted=True)


async def hand_over(app: FastAPI) -> None:
    """SIGTERM (draining.py): stop driving every request, let the survivors adopt them, and
    wait (at most `drain_grace_s`) while this gateway's waiters get the answers they store."""
    state = app.state
    state.orchestrator.hand_over()
    await state.orchestrator.leases.release_all()
    await state.in_flight.wait(state.settings.drain_grace_s)


# The API key scope each router's routes need; None: public (probes and scrapers). Every router
# is listed here, so a new route is guarded by the router it joins (a test checks the OpenAPI
# document: no route but these answers without a key).
ROUTERS: tuple[tuple[APIRouter, Scope | None], ...] = (
    (status.router, Scope.ADMIN),
    (health.router, None),
    (models.mesh_router, Scope.ADMIN),  # /v1/models: replicas, hosts, pids
    (models.router, Scope.GENERATE),  # /v1/workflows: what a client may ask for
    (images.router, Scope.GENERATE),
    (files.router, None),  # image links: the random token in the link is the capability (image_files.py)
    (edits.router, Scope.GENERATE),
    (requests.router, Scope.GENERATE),
    (keys.router, Scope.ADMIN),
    (loras.router, Scope.GENERATE),  # GET /v1/loras: the names a request may use
    (loras.admin_router, Scope.ADMIN),  # registering and deleting them
)


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="LegoDiffusion gateway",
        version="0.1.0",
        description="Text-to-image workflows served as a mesh of per-model services.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.in_flight = InFlight()  # async requests being answered
    app.state.drain = Drain()  # SIGTERM (services/gateway/__main__.py)
    app.state.rate_limiter = RateLimiter()
    app.state.image_files = ImageFiles(settings.image_url_ttl_s, int(settings.image_url_max_mb * 2**20))
    install_error_handlers(app)
    # Outermost but for Starlette's own error middleware: a body is measured before any route reads it.
    app.add_middleware(BodyLimits, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(AuthenticateFirst)  # outermost: no body of an anonymous caller is read
    for router, scope in ROUTERS:
        app.include_router(router, dependencies=guard(scope), responses=COMMON_ERRORS)
    install_openapi(app, settings.default_workflow)
    return app
