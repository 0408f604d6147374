"""The OpenAPI document states every rule the gateway enforces: the errors each route answers,
and which fields each workflow takes (as JSON-schema `if`/`then` rules on the request body).

Why: the document is the contract (a client generator, or a fuzzer, reads it). A body the
document calls valid should be one the gateway accepts, and every error it can answer should
be there in the shape it has.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from services.gateway.loras import bind
from services.gateway.schemas import SIDE_MULTIPLE, ErrorResponse, size_or_auto_pattern
from shared.workflows.catalogue import catalogue
from shared.workflows.spec import WorkflowSpec
from shared.zoo.families import family

_ERROR = {"model": ErrorResponse}
# What any route may answer: a malformed or too deeply nested body (400), no or a bad API key
# (401), a key without the right (403), a body over the size limit (413), bad parameters (422).
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {**_ERROR, "description": "malformed request: bad JSON, nested too deep, a bad header"},
    401: {**_ERROR, "description": "no API key, or an unknown one"},
    403: {**_ERROR, "description": "the API key may not do this"},
    413: {**_ERROR, "description": "request body over the gateway's limit (LEGO_MAX_BODY_BYTES)"},
    422: {**_ERROR, "description": "a parameter or body field breaks a rule; the message names it"},
}


# Not stated here: output_quality / output_compression with png (a 422, said in their
# descriptions). As an `anyOf` beside the workflow rules it doubled their branches, and with the
# OpenAI fields the body's canonical form outgrew what schemathesis (jsonschema_rs) expands: the
# route could not be fuzzed at all. Its budget is about 1,200 properties x branches; this body
# is 30 x 29.


def install_openapi(app: FastAPI, default_workflow: str) -> None:
    """Generate the document with the request body's per-workflow rules added (they depend on
    the server's default workflow, the one a body naming none gets, and on the LoRAs
    registered: the document is made again after each change of the registry)."""
    made_at: list[int] = [-1]

    def openapi() -> dict[str, Any]:
        registry = getattr(app.state, "loras", None)
        version = registry.version if registry is not None else -1
        if app.openapi_schema is None or made_at[0] != version:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            body = doc["components"]["schemas"]["ImageGenerationRequest"]
            bound = (lambda w: bind(w, registry)) if registry is not None else None
            body["allOf"] = [workflow_rules(default_workflow, bound)]
            app.openapi_schema, made_at[0] = doc, version
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def workflow_rules(
    default_workflow: str, bound: Callable[[WorkflowSpec], WorkflowSpec] | None = None
) -> dict[str, Any]:
    """One branch per way of choosing a workflow, each with what that workflow requires and
    refuses (admission's checks, stated). An `anyOf` of branches rather than one `if`/`then`
    per workflow: the same rules, but a generator expands n `if`/`then`s into 2^n cases and
    gives up (schemathesis does at 15)."""
    return {
        "anyOf": [
            {"allOf": [way, workflow_fields(bound(w) if bound else w)]}
            for w in catalogue().values()
            for way in _chosen(w.name, default_workflow)
        ]
    }


def _chosen(name: str, default_workflow: str) -> list[dict[str, Any]]:
    """The ways a body runs workflow `name`: it names it in `workflow`, or in `model` with no
    `workflow`, or names neither and `name` is the default."""
    null = {"type": "null"}
    ways: list[dict[str, Any]] = [
        {"properties": {"workflow": {"const": name}}, "required": ["workflow"]},
        {"properties": {"workflow": null, "model": {"const": name}}, "required": ["model"]},
    ]
    if name == default_workflow:
        ways.append({"properties": {"workflow": null, "model": null}})
    return ways


def workflow_fields(w: WorkflowSpec) -> dict[str, Any]:
    """What a body running `w` must hold: a controlnet (of its models) or none, LoRAs of its
    base model or none, no negative prompt for a guidance-distilled family, its size multiple."""
    rule: dict[str, Any] = {"properties": {}}
    props = rule["properties"]
    if w.controlnets:
        rule["required"] = ["controlnet"]
        props["controlnet"] = {
            "type": "object",
            "properties": {"model": {"anyOf": [{"enum": w.controlnets}, {"type": "null"}]}},
        }
    else:
        props["controlnet"] = {"type": "null"}
    if w.loras:
        # Each named once, so no more items than names (the rest of "once" is in the description).
        loras = {"type": "array", "items": {"type": "object", "properties": {"name": {"enum": w.loras}}}}
        props["loras"] = {"anyOf": [{"type": "null"}, {**loras, "maxItems": len(w.loras)}]}
    else:
        props["loras"] = {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]}
    desc = family(w.family)
    if not desc.cfg:
        props["negative_prompt"] = {"maxLength": 0}
    if desc.size_multiple != SIDE_MULTIPLE:
        props["size"] = {"pattern": size_or_auto_pattern(desc.size_multiple)}
    return rule
