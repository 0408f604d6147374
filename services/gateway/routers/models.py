"""What the gateway can run: the catalogue's workflows, and the models with live replicas.
Two routers, because the two answer different people (see `create_app`'s scopes)."""

from __future__ import annotations

from fastapi import APIRouter

from services.gateway.deps import BusDep, LorasDep, SettingsDep
from services.gateway.loras import bind
from services.gateway.schemas import (
    LoraInput,
    ModelInfo,
    ModelList,
    NodeInfo,
    ReplicaSummary,
    WorkflowInfo,
    WorkflowList,
)
from shared.messages import ReplicaInfo
from shared.presence import live_replicas
from shared.workflows.catalogue import catalogue
from shared.workflows.spec import WorkflowSpec
from shared.zoo.registry import MODELS

router = APIRouter()  # what may be asked for: a client's (generate scope)
mesh_router = APIRouter()  # where it runs (replicas, hosts, pids): an operator's (admin scope)


@mesh_router.get("/v1/models", response_model=ModelList)
async def models(bus: BusDep) -> ModelList:
    """Every model with a live replica, which replicas hold it, and the workflows using it."""
    by_model: dict[str, dict[str, ReplicaInfo]] = {}
    kinds: dict[str, set[str]] = {}
    for r in await live_replicas(bus):
        by_model.setdefault(r.model_id, {})[r.replica_id] = r  # a replica announces once per step kind
        kinds.setdefault(r.model_id, set()).add(str(r.kind))
    return ModelList(
        models=[_model_info(model_id, kinds[model_id], replicas) for model_id, replicas in sorted(by_model.items())]
    )


def _model_info(model_id: str, kinds: set[str], replicas: dict[str, ReplicaInfo]) -> ModelInfo:
    info = MODELS.get(model_id)
    return ModelInfo(
        model_id=model_id,
        kinds=sorted(kinds),
        role=info.role if info else "unknown",
        service=info.service if info else "unknown",
        description=info.description if info else "",
        replicas=[ReplicaSummary.model_validate(r, from_attributes=True) for _, r in sorted(replicas.items())],
        workflows=[w.name for w in catalogue().values() if model_id in {m for _, m in w.models()}],
    )


@router.get("/v1/workflows", response_model=WorkflowList)
async def workflows(settings: SettingsDep, loras: LorasDep) -> WorkflowList:
    """Every workflow; a `-lora` workflow lists every LoRA registered for its base (`/v1/loras`)."""
    listed = [_workflow_info(bind(w, loras)) for w in catalogue().values()]
    return WorkflowList(default=settings.default_workflow, workflows=listed)


def _workflow_info(w: WorkflowSpec) -> WorkflowInfo:
    return WorkflowInfo(
        name=w.name,
        description=w.description,
        family=w.family,
        models=[m for _, m in w.models()],
        nodes=[NodeInfo(id=n.id, kind=str(n.kind), model=n.model, inputs=n.inputs) for n in w.nodes],
        controlnets=w.controlnets,
        loras=w.loras,
        default_loras=[LoraInput(name=x.name, scale=x.scale) for x in w.default_loras],
    )
