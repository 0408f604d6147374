"""`/v1/keys`: make, list and revoke API keys (the admin scope; `lego keys` calls these).

A new key is answered once, in the `POST` reply; the store keeps only its hash, so a lost key
cannot be shown again: revoke it and make another.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, Field

from services.gateway.errors import APIError
from services.gateway.keys.model import NAME_PATTERN, KeyInfo, KeyLimits
from services.gateway.keys.store import KeyExists, KeyStore
from services.gateway.schemas import ErrorResponse

router = APIRouter(tags=["keys"])


class KeyCreate(KeyLimits):
    name: str = Field(pattern=NAME_PATTERN, description="unique among live keys: 1-64 letters, digits, '-' or '_'")


class KeyCreated(KeyInfo):
    key: str = Field(description="the API key: shown this once, stored only as its hash")


class KeyList(BaseModel):
    keys: list[KeyInfo]


def get_keys(request: Request) -> KeyStore:
    return request.app.state.keys


KeysDep = Annotated[KeyStore, Depends(get_keys)]


@router.post("/v1/keys", response_model=KeyCreated, status_code=201, responses={409: {"model": ErrorResponse}})
async def create_key(body: KeyCreate, keys: KeysDep) -> KeyCreated:
    """Make a key; the reply is the only time the key itself is shown."""
    try:
        key, record = await keys.create(body.name, KeyLimits.model_validate(body.model_dump(exclude={"name"})))
    except KeyExists:
        raise APIError(
            409, "key_exists", f"a key named {body.name!r} exists; revoke it first or pick another name"
        ) from None
    return KeyCreated(key=key, **record.info().model_dump())


@router.get("/v1/keys", response_model=KeyList)
async def list_keys(keys: KeysDep) -> KeyList:
    """Every live key: names, ids, scopes and limits (never a key or its hash)."""
    return KeyList(keys=[r.info() for r in keys.list()])


@router.delete("/v1/keys/{name}", response_model=KeyInfo, responses={404: {"model": ErrorResponse}})
async def revoke_key(keys: KeysDep, name: str = Path(pattern=NAME_PATTERN)) -> KeyInfo:
    """Revoke a key: every gateway refuses it within moments (they watch the key bucket)."""
    record = await keys.revoke(name)
    if record is None:
        raise APIError(404, "unknown_key", f"no key named {name!r}; `GET /v1/keys` lists them")
    return record.info()
