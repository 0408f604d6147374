"""The workflow catalogue: every JSON spec under `specs/`, validated once at import."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from shared.workflows.planner import validate
from shared.workflows.spec import WorkflowSpec

SPEC_DIR = Path(__file__).parent / "specs"


@cache
def catalogue() -> dict[str, WorkflowSpec]:
    specs = {}
    for path in sorted(SPEC_DIR.glob("*.json")):
        spec = WorkflowSpec.model_validate_json(path.read_text())
        validate(spec)
        specs[spec.name] = spec
    return specs


def get_workflow(name: str) -> WorkflowSpec:
    try:
        return catalogue()[name]
    except KeyError:
        raise KeyError(f"unknown workflow {name!r}; known: {', '.join(sorted(catalogue()))}") from None
