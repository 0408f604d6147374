"""The dependency every route but the probes goes through: who is calling (their API key, sent
as `Authorization: Bearer <key>`, as OpenAI clients do) and whether that key has the scope.

Why at the router level (`create_app` includes each router with `require(scope)`): a route
added later is guarded by the router it joins; no route has to remember to ask. The key
itself is never logged or echoed: refusals name the key's *name* at most.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.gateway.errors import APIError
from services.gateway.keys.model import ANONYMOUS, KeyRecord, Scope
from services.gateway.keys.store import KeyStore

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="APIKey",
    description="an API key: `Authorization: Bearer lego-...` (`lego keys create` makes one)",
)


def _unauthorized(message: str, error: str) -> APIError:
    return APIError(401, "invalid_api_key", message, headers={"WWW-Authenticate": f'Bearer error="{error}"'})


def identify(state: Any, authorization: str | None) -> KeyRecord:
    """The caller's key record from an `Authorization` header value (ANONYMOUS when auth is
    off); 401 without a valid key. `state`: the app's state (its settings and key store). The
    one check, run by `AuthenticateFirst` before a body is read and by `authenticate` for routes."""
    if state.settings.auth == "off":
        return ANONYMOUS
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise _unauthorized(
            "this route needs an API key: send `Authorization: Bearer <key>` "
            "(`lego keys create` makes one; `lego up` printed the admin key)",
            "invalid_request",
        )
    keys: KeyStore = state.keys
    record = keys.lookup(credentials.strip())
    if record is None:
        raise _unauthorized("the API key is not valid: unknown or revoked", "invalid_token")
    return record


async def authenticate(
    request: Request, _docs: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> KeyRecord:
    """The caller's key record (`_docs` only puts the Bearer scheme into the OpenAPI document)."""
    return identify(request.app.state, request.headers.get("authorization"))


Caller = Annotated[KeyRecord, Depends(authenticate)]


def require(scope: Scope) -> Callable[[KeyRecord], Coroutine[Any, Any, KeyRecord]]:
    """A dependency: the caller's key, which must have `scope` (403 otherwise)."""

    async def _require(caller: Caller) -> KeyRecord:
        if not caller.allows(scope):
            raise APIError(
                403,
                "insufficient_scope",
                f"API key {caller.name!r} lacks the {scope.value!r} scope this route needs "
                f"(it has: {', '.join(caller.scopes)})",
            )
        return caller

    _require.__name__ = f"require_{scope.value}"
    return _require


def guard(scope: Scope | None) -> list[Any]:
    """The router-level dependencies for routes that need `scope` (None: public, for probes)."""
    return [] if scope is None else [Depends(require(scope))]
