"""Typed API errors and the handlers that turn every failure into `{"error": {code, message}}`."""

from __future__ import annotations

import logging

import nats.errors
import nats.js.errors
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("lego.gateway")

# The bus not answering (a NATS server down, a stream electing its leader, a reconnect): a fault
# of the moment, not of the request, which the caller retries (with its Idempotency-Key).
BUS_FAULTS = (nats.errors.Error, nats.js.errors.Error, TimeoutError, ConnectionError)


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _describe(errors: list[dict]) -> tuple[str, str]:
    """One readable sentence from pydantic's error list, and whether the body was not JSON."""
    parts = []
    for err in errors:
        if err.get("type") == "json_invalid":
            return "invalid_json", f"request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}"
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg.removeprefix('Value error, ')}")
    return "invalid_request", "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        code, message = _describe(list(exc.errors()))
        return error_response(400 if code == "invalid_json" else 422, code, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, BUS_FAULTS):
            log.warning("the bus did not answer: %s: %s", type(exc).__name__, exc)
            return error_response(
                503,
                "bus_unavailable",
                f"the message bus did not answer ({type(exc).__name__}): NATS is restarting or electing a leader;"
                " retry in a moment (with the same Idempotency-Key, on any gateway)",
                {"Retry-After": "1"},
            )
        log.exception("unhandled error")
        return error_response(
            500, "internal_error", f"the gateway failed unexpectedly ({type(exc).__name__}); see its log"
        )
