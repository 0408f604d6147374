"""`GET /v1/status`: what the mesh runs and how far behind each model is, for people and `lego status`.

Backlogs come straight from JetStream (every step consumer's pending + ack-pending), replicas
from the presence bucket, and the units, their targets and the latest scaling decisions from
the autoscaler's status key (absent when no autoscaler runs). No torch: numbers only.
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from services.gateway.deps import BusDep
from services.gateway.overload import serving
from shared.messages import AutoscalerStatus
from shared.presence import autoscaler_status, live_replicas

router = APIRouter()


class ConsumerStatus(BaseModel):
    """One (kind, model) step consumer: its backlog and the replicas consuming it."""

    kind: str
    model_id: str
    pending: int = Field(description="steps not yet delivered to any replica")
    ack_pending: int = Field(description="steps delivered and not yet acknowledged (in hand)")
    backlog: int = Field(description="pending + ack_pending: the autoscaler's signal")
    replicas: int = Field(description="live replicas consuming it")
    seconds_per_item: float = Field(0.0, description="measured step time, averaged over its replicas (0: none yet)")


class MeshStatus(BaseModel):
    consumers: list[ConsumerStatus]
    autoscaler: AutoscalerStatus | None = Field(
        None, description="units, replicas, targets and the latest decisions; null when no autoscaler runs"
    )


@router.get("/v1/status", response_model=MeshStatus, tags=["status"])
async def mesh_status(bus: BusDep) -> MeshStatus:
    """Replicas and backlog of every model, and the autoscaler's current view and decisions."""
    replicas = await live_replicas(bus)
    consumers = []
    for c in sorted(await bus.step_consumers(), key=lambda c: (c.model_id, c.kind)):
        count, step_s = serving(replicas, c.kind, c.model_id)
        consumers.append(
            ConsumerStatus(
                kind=c.kind,
                model_id=c.model_id,
                pending=c.pending,
                ack_pending=c.ack_pending,
                backlog=c.backlog,
                replicas=count,
                seconds_per_item=round(step_s, 4),
            )
        )
    return MeshStatus(consumers=consumers, autoscaler=await autoscaler_status(bus))
