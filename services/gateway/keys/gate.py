"""Authentication before anything else: a request without a valid API key is answered 401
before its body is read or parsed, whatever its path.

Why a middleware on top of the routers' `require(scope)`: FastAPI reads and parses a route's
body before its dependencies run, so an anonymous client would otherwise get 400s and 422s
that describe the API, and make the gateway parse what it sends. Here only the probes, the
published API document and image links are open; the scope check (403) stays with each router.
"""

from __future__ import annotations

from typing import Any

from services.gateway.errors import APIError, error_response
from services.gateway.keys.auth import identify
from services.gateway.limits import ASGIApp, Receive, Scope, Send

# Load balancers and Prometheus call the probes; the API document is the published contract
# (and /docs needs it to offer its Authorize button).
PUBLIC_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
)
# Image links (`response_format: "url"`): fetched by browsers and services that hold no key; the
# link's random token is the capability (services/gateway/image_files.py).
PUBLIC_PREFIXES = ("/v1/images/files/",)


def is_public(path: str) -> bool:
    """Whether `path` answers without an API key."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class AuthenticateFirst:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        state: Any = scope["app"].state
        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        try:
            identify(state, authorization)
        except APIError as exc:
            await error_response(exc.status, exc.code, exc.message, exc.headers)(scope, receive, send)
            return
        await self.app(scope, receive, send)
