"""The headers both `POST` routes (generations, edits) read, declared once so that the two
document, check and name them alike: `X-Request-Id` (the caller's own id for its request) and
`Idempotency-Key` (a retry answers the request the key named first: `taking.py`)."""

from __future__ import annotations

import re
import uuid
from typing import Annotated

from fastapi import Depends, Header

from services.gateway.errors import APIError

REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def checked_request_id(x_request_id: str | None) -> str:
    """The client's X-Request-Id (400 unless 1-64 letters, digits, '-' or '_'), else a new id."""
    if x_request_id is not None and not REQUEST_ID.match(x_request_id):
        raise APIError(400, "invalid_request_id", "X-Request-Id must be 1-64 letters, digits, '-' or '_'")
    return x_request_id or uuid.uuid4().hex


async def request_id(
    x_request_id: str | None = Header(
        None,
        description="optional id to follow the request's progress: 1-64 letters, digits, '-' or '_' (else 400)",
        json_schema_extra={"pattern": REQUEST_ID.pattern},
    ),
) -> str:
    """The request's id: the X-Request-Id header's (checked), else a new one. async: FastAPI
    would run a plain function on its thread pool."""
    return checked_request_id(x_request_id)


RequestIdDep = Annotated[str, Depends(request_id)]
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        description="retry safely: the same key (with the same body) on any gateway, within 24 h, "
        "answers the request it named first instead of generating again; another body is a 422",
    ),
]
