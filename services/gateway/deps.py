"""What the routes depend on, read from `app.state` (built by `create_app` and its lifespan).

Why `Depends` and not closures or module globals: a route declares what it needs, and a test
can hand it something else with `app.dependency_overrides`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.gateway import records
from services.gateway.answering import InFlight
from services.gateway.errors import APIError
from services.gateway.image_files import ImageFiles
from services.gateway.keys.auth import Caller
from services.gateway.keys.limits import RateLimiter
from services.gateway.orchestrator import Orchestrator
from services.gateway.overload import LoadView
from services.gateway.records import record_key
from services.gateway.request_state import Owner, RequestState, RunStatus
from services.gateway.running import Gateway
from shared.bus import Bus
from shared.lora_registry import LoraRegistry
from shared.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_bus(request: Request) -> Bus:
    return request.app.state.bus


def get_orchestrator(request: Request) -> Orchestrator:
    return request.app.state.orchestrator


def get_load_view(request: Request) -> LoadView:
    return request.app.state.load_view


def get_in_flight(request: Request) -> InFlight:
    return request.app.state.in_flight


def get_image_files(request: Request) -> ImageFiles:
    return request.app.state.image_files


def get_rate_limiter(request: Request) -> RateLimiter:
    return request.app.state.rate_limiter


def get_gateway(request: Request) -> Gateway:
    """What running an admitted request needs (`running.run_admitted`)."""
    state = request.app.state
    return Gateway(
        state.settings,
        state.orchestrator,
        state.load_view,
        state.in_flight,
        state.image_files,
        state.loras,
        state.drain,
        state.idempotency,
    )


def get_loras(request: Request) -> LoraRegistry:
    return request.app.state.loras


def get_owner(caller: Caller) -> Owner:
    """The caller as a request's owner (empty when auth is off)."""
    return Owner(key_id=caller.key_id, name=caller.name if caller.key_id else "")


SettingsDep = Annotated[Settings, Depends(get_settings)]
BusDep = Annotated[Bus, Depends(get_bus)]
OrchestratorDep = Annotated[Orchestrator, Depends(get_orchestrator)]
LoadViewDep = Annotated[LoadView, Depends(get_load_view)]
InFlightDep = Annotated[InFlight, Depends(get_in_flight)]
ImageFilesDep = Annotated[ImageFiles, Depends(get_image_files)]
RateLimiterDep = Annotated[RateLimiter, Depends(get_rate_limiter)]
OwnerDep = Annotated[Owner, Depends(get_owner)]
GatewayDep = Annotated[Gateway, Depends(get_gateway)]
LorasDep = Annotated[LoraRegistry, Depends(get_loras)]


async def get_request_state(request_id: str, orchestrator: OrchestratorDep, owner: OwnerDep) -> RequestState:
    """The caller's request named in the path, or a 404: another key's request answers exactly
    as an unknown id does, so ids reveal nothing across keys. A request this gateway does not
    drive (another does, or did) is rebuilt from its record and events (records.py)."""
    state = orchestrator.get(request_id, owner)
    if state is not None and not state.handed_over and not _images_dropped(orchestrator, state):
        return state
    view = await records.view(orchestrator.store, record_key(owner.key_id, request_id))
    if view is None:
        raise APIError(404, "unknown_request", f"no request {request_id!r}")
    return view


def _images_dropped(orchestrator: Orchestrator, state: RequestState) -> bool:
    """Whether this gateway let go of a finished request's images (it keeps the newest few),
    which its record in JetStream still holds."""
    answered = state.status is RunStatus.SUCCEEDED and state.run_id not in orchestrator.answers
    return orchestrator.store is not None and answered and state.result is None


RequestStateDep = Annotated[RequestState, Depends(get_request_state)]
