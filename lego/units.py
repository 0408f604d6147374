"""Which processes serve a set of workflows: units (a service hosting some models) and their plan.

Why apart from the launcher: `lego up` validates `--replicas UNIT=N` against the plan, the
autoscaler and the benchmarks size units by it, and none of them needs to start a process.
"""

from __future__ import annotations

from dataclasses import dataclass

SERVICES = ("encoder", "denoiser", "adapters", "vae")


@dataclass(frozen=True)
class Unit:
    """One kind of service process: a service hosting a set of models; replicas are its copies.

    Encoders, VAEs and ControlNets share one process per service (they take turns on the
    cores); each base model gets its own denoiser unit, named after the model, because the
    denoising loop is where the time goes and each base scales on its own."""

    name: str
    service: str
    models: tuple[str, ...]


def plan_units(workflows: list[str] | None = None) -> list[Unit]:
    """The processes that serve `workflows` (default: the whole catalogue), each model once."""
    from shared.workflows.catalogue import catalogue as full_catalogue
    from shared.workflows.catalogue import get_workflow
    from shared.zoo.registry import models_of_service

    chosen = [get_workflow(w) for w in workflows] if workflows else list(full_catalogue().values())
    needed = {model for w in chosen for _, model in w.models()}
    units = []
    for service in SERVICES:
        models = tuple(m for m in models_of_service(service) if m in needed)
        if service == "denoiser":
            units.extend(Unit(m, service, (m,)) for m in models)
        elif models:
            units.append(Unit(service, service, models))
    return units


# Devices a denoiser replica may own (LEGO_DENOISE_GROUP_SIZE; services/denoiser/group/): its
# pod's GPUs cuda:0..k-1, or k CPU processes. A group is formed at start and is one replica.
GROUP_SIZES = (1, 2, 4)
GROUPED_SERVICE = "denoiser"


def check_groups(groups: dict[str, int], units: list[Unit]) -> None:
    """Raise ValueError naming what is wrong when `groups` (unit -> devices per replica) names a
    unit that is not one of `units`' denoisers, or a size other than GROUP_SIZES: only a base
    model's denoising loop can be split over devices."""
    denoisers = [u.name for u in units if u.service == GROUPED_SERVICE]
    for name, size in groups.items():
        if name not in denoisers:
            raise ValueError(f"group {name}={size}: {name} is not a denoiser unit here; denoiser units: {denoisers}")
        if size not in GROUP_SIZES:
            sizes = ", ".join(map(str, GROUP_SIZES))
            raise ValueError(f"group {name}={size}: a group is {sizes} devices")
