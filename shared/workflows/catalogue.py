"""The workflow catalogue: each family's spec under `specs/` and its ControlNet/LoRA variants.

Validated once, at first use: a spec naming a model the zoo does not know, or a LoRA for
another base, fails loudly at start instead of at the first request.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from shared.messages import StepKind
from shared.workflows.planner import WorkflowError, validate
from shared.workflows.spec import WorkflowSpec
from shared.workflows.variants import variants
from shared.zoo.registry import LORAS, MODELS

SPEC_DIR = Path(__file__).parent / "specs"


def check_models(spec: WorkflowSpec) -> None:
    """Every model a spec names exists in the zoo, and every LoRA belongs to its base model."""
    unknown = [m for _, m in spec.models() if m not in MODELS]
    if unknown:
        raise WorkflowError(f"workflow {spec.name!r}: unknown model ids {unknown}")
    if spec.loras:
        base = spec.node_of_kind(StepKind.DENOISE).model
        wrong = [name for name in spec.loras if name not in LORAS or LORAS[name].base != base]
        if wrong:
            raise WorkflowError(f"workflow {spec.name!r}: LoRAs {wrong} are not LoRAs of {base}")


@cache
def catalogue() -> dict[str, WorkflowSpec]:
    specs = {}
    for path in sorted(SPEC_DIR.glob("*.json")):
        for spec in variants(WorkflowSpec.model_validate_json(path.read_text())):
            validate(spec)
            check_models(spec)
            specs[spec.name] = spec
    return specs


def get_workflow(name: str) -> WorkflowSpec:
    try:
        return catalogue()[name]
    except KeyError:
        raise KeyError(f"unknown workflow {name!r}; known: {', '.join(sorted(catalogue()))}") from None
