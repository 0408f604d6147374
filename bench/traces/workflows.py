"""Which workflow of our catalogue serves a trace request: one rule, for generators, loaders and
replays alike.

A production request names a base model and the adapters it uses; our catalogue
(`shared.workflows.catalogue.catalogue()`) has, per base model family, a plain workflow and, for
the families whose zoo has them (sd3, sd35-large, flux), `-controlnet`, `-lora` and
`-controlnet-lora` variants. sd15 and sdxl have only the plain workflow, so their requests map
to it whatever adapters they name (the simulator still sees the adapters on the record).
"""

from __future__ import annotations

from functools import cache

from shared.workflows.catalogue import catalogue

# The base model families a trace may name, in the order the generator ranks them by default.
FAMILIES: tuple[str, ...] = ("sdxl", "sd15", "flux", "sd3", "sd35-large")


@cache
def _names() -> frozenset[str]:
    return frozenset(catalogue())


@cache
def workflow_of(base_model: str, has_cn: bool, has_lora: bool) -> str:
    """The catalogue workflow for a request on `base_model` with or without ControlNets / LoRAs.

    The most specific variant the catalogue has: `<base>-controlnet-lora` when both are used,
    else `<base>-controlnet` / `<base>-lora`, else the plain `<base>`. A variant the catalogue
    lacks falls back to the next less specific one (a ControlNet-and-LoRA request on sd15 is
    served by `sd15`). Raises ValueError for a base model the catalogue does not know.
    """
    names = _names()
    if base_model not in names:
        raise ValueError(f"unknown base model {base_model!r}; the catalogue's are {sorted(FAMILIES)}")
    candidates = []
    if has_cn and has_lora:
        candidates.append(f"{base_model}-controlnet-lora")
    if has_cn:
        candidates.append(f"{base_model}-controlnet")
    if has_lora:
        candidates.append(f"{base_model}-lora")
    for name in candidates:
        if name in names:
            return name
    return base_model
