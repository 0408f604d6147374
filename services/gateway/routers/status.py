"""`GET /v1/status`: what the mesh runs and how far behind each model is, for people and `lego status`.

Backlogs come straight from JetStream (every step consumer's pending + ack-pending), replicas
from the presence bucket, and the units, their targets and the latest scaling decisions from
the autoscaler's status key (absent when no autoscaler runs), and the bus itself (how many
NATS servers, how the step stream is replicated) from the client and the stream's info. No
torch: numbers only.
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from services.gateway.deps import BusDep
from services.gateway.overload import serving
from shared import subjects
from shared.bus import Bus
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


class NatsStatus(BaseModel):
    """The bus as this gateway sees it: a single nats-server, or a cluster (`lego up --nats-servers 3`)."""

    servers: int = Field(description="NATS servers this gateway's client knows (given and discovered)")
    cluster: str | None = Field(None, description="the JetStream cluster's name; null on a single server")
    step_stream_replicas: int = Field(description="copies of the step stream (LEGO_STREAM_REPLICAS)")
    leader: str | None = Field(None, description="the server leading the step stream")
    current: list[str] = Field(default_factory=list, description="servers with an up-to-date copy, the leader's too")


class MeshStatus(BaseModel):
    consumers: list[ConsumerStatus]
    nats: NatsStatus | None = Field(None, description="the bus's servers and the step stream's copies")
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
    return MeshStatus(consumers=consumers, nats=await _nats_status(bus), autoscaler=await autoscaler_status(bus))


async def _nats_status(bus: Bus) -> NatsStatus:
    info = await bus.js.stream_info(subjects.STEP_STREAM)
    cluster = info.cluster
    peers = (cluster.replicas or []) if cluster is not None else []
    leader = cluster.leader if cluster is not None else None
    return NatsStatus(
        servers=len({url.netloc for url in bus.nc.servers}),
        cluster=cluster.name if cluster is not None else None,
        step_stream_replicas=info.config.num_replicas or 1,
        leader=leader,
        current=([leader] if leader else []) + sorted(p.name for p in peers if p.current and p.name),
    )
