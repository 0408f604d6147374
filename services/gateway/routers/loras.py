"""`/v1/loras`: register (from a path or by upload), list and delete LoRAs on a running mesh.

Registering and deleting are an admin's (the admin scope when API keys are on); listing is
every client's, like `GET /v1/workflows` whose `-lora` workflows take these names. Every
gateway follows the registry's bucket, so a LoRA registered through one gateway is accepted by
all of them moments later, and a deleted one refused; requests already running keep theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, Field, ValidationError

from services.gateway.deps import LorasDep, SettingsDep
from services.gateway.errors import APIError
from services.gateway.loras import check_file, keep_upload, remove_later, store_upload
from services.gateway.schemas import ErrorResponse
from shared.lora_registry import NAME_PATTERN, LoraExists, LoraRecord, LoraRegistry, lora_bases
from shared.settings import Settings
from shared.zoo.families import FAMILIES

_removals: set[asyncio.Task[None]] = set()  # deleted uploads' files waiting out their grace
router = APIRouter(tags=["loras"])  # reading: any client
admin_router = APIRouter(tags=["loras"])  # registering, deleting: the admin scope


class LoraRegister(BaseModel):
    """Register a LoRA file every model service can read (a shared volume on a cluster)."""

    name: str = Field(pattern=NAME_PATTERN, description="1-64 letters, digits, '-' or '_'; unique")
    base: str = Field(description="the denoiser it adapts (sd3-transformer, ...) or its family (sd3, ...)")
    path: str = Field(description="absolute path of a .safetensors file (or a directory holding one)")
    description: str = Field("", max_length=500)


class LoraList(BaseModel):
    loras: list[LoraRecord]


_UPLOAD_FORM = {
    "type": "object",
    "required": ["name", "base", "file"],
    "properties": {
        "name": {"type": "string", "pattern": NAME_PATTERN},
        "base": {"type": "string"},
        "description": {"type": "string"},
        "file": {"type": "string", "format": "binary", "description": "the LoRA, safetensors (never a pickle)"},
    },
}
_REGISTER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/LoraRegister"}},
            "multipart/form-data": {"schema": _UPLOAD_FORM},
        },
    }
}


@admin_router.post(
    "/v1/loras",
    response_model=LoraRecord,
    status_code=201,
    openapi_extra=_REGISTER_BODY,
    responses={400: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
)
async def register_lora(request: Request, settings: SettingsDep, loras: LorasDep) -> LoraRecord:
    """Register a LoRA: JSON `{name, base, path}` for a file the model services can read, or a
    multipart upload (`name`, `base`, `file`) stored under the gateway's LoRA directory. The
    file must be safetensors in the diffusers LoRA format and fit `base` (else 400, naming the
    base it fits); a taken name is a 409. Usable at once by the base's `-lora` workflows."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        record = await _from_upload(request, settings, loras)
    else:
        body = _parse(LoraRegister, await _json(request))
        _free(body.name, loras)
        base = _base(body.base)
        path = Path(body.path)
        if not path.is_absolute():
            raise APIError(400, "invalid_lora", f"path {body.path!r} is not absolute; give the file's full path")
        sha, size = await asyncio.to_thread(check_file, path, base, settings)
        record = LoraRecord(name=body.name, base=base, source="path", path=str(path), sha256=sha, bytes=size)
        record.description = body.description
    try:
        await loras.register(record)
    except LoraExists:
        raise _taken(record.name) from None
    return record


async def _from_upload(request: Request, settings: Settings, loras: LoraRegistry) -> LoraRecord:
    form = await request.form()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise APIError(400, "invalid_lora", "a multipart registration needs the LoRA in a 'file' part")
    body = _parse(LoraRegister, {**fields, "path": "upload"})
    _free(body.name, loras)
    base = _base(body.base)
    tmp = await asyncio.to_thread(store_upload, await upload.read(), settings)
    try:
        sha, size = await asyncio.to_thread(check_file, tmp, base, settings)
        path = await asyncio.to_thread(keep_upload, tmp, sha, settings)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return LoraRecord(
        name=body.name, base=base, source="upload", path=str(path), sha256=sha, bytes=size, description=body.description
    )


@router.get("/v1/loras", response_model=LoraList)
async def list_loras(request: Request, loras: LorasDep, base: str | None = None) -> LoraList:
    """Every registered LoRA (built-ins first), or those of one base model (`?base=`)."""
    unknown = sorted(set(request.query_params) - {"base"})
    if unknown:  # a misspelt filter would otherwise list every LoRA as if it had applied
        raise APIError(
            400, "invalid_request", f"unknown query parameter(s) {', '.join(unknown)}; this route takes base"
        )
    records = loras.records()
    if base is not None:
        wanted = _base(base)
        records = [r for r in records if r.base == wanted]
    return LoraList(loras=records)


_DELETE_ERRORS: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}}


@admin_router.delete("/v1/loras/{name}", response_model=LoraRecord, responses=_DELETE_ERRORS)
async def delete_lora(
    settings: SettingsDep, loras: LorasDep, name: str = PathParam(pattern=NAME_PATTERN)
) -> LoraRecord:
    """Delete a LoRA: new requests naming it are refused (422) on every gateway within moments;
    requests already planned with it finish with it. A built-in LoRA cannot be deleted."""
    record = loras.get(name)
    if record is None:
        raise APIError(404, "unknown_lora", f"no LoRA named {name!r}; `GET /v1/loras` lists them")
    if record.source == "builtin":
        raise APIError(409, "builtin_lora", f"{name!r} is a built-in LoRA (a workflow's default); it stays")
    await loras.delete(name)
    if record.source == "upload":
        task = asyncio.get_running_loop().create_task(remove_later(record, loras, settings.lora_delete_grace_s))
        _removals.add(task)  # a task nobody references may be collected before it runs
        task.add_done_callback(_removals.discard)
    return record


def _base(value: str) -> str:
    """A denoiser id from an id or a family name; 400 naming the bases that take LoRAs."""
    if value in FAMILIES:
        value = FAMILIES[value].denoiser
    if value not in lora_bases():
        raise APIError(400, "invalid_lora", f"base {value!r} takes no LoRAs here; bases: {', '.join(lora_bases())}")
    return value


def _free(name: str, loras: LoraRegistry) -> None:
    if loras.get(name) is not None:
        raise _taken(name)


def _taken(name: str) -> APIError:
    return APIError(409, "lora_exists", f"a LoRA named {name!r} exists; delete it first or pick another name")


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError:
        raise APIError(400, "invalid_lora", "send JSON {name, base, path} or a multipart upload") from None


def _parse(model: type[LoraRegister], data: Any) -> LoraRegister:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "body"
        raise APIError(422, "invalid_request", f"{where}: {first['msg']}") from None
