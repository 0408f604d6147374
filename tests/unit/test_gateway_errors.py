"""What a caller sees when something fails inside the gateway: the bus not answering is a 503 to
retry (with Retry-After), a bug is a 500 naming where to look; never a stack trace."""

from __future__ import annotations

import nats.errors
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from services.gateway.errors import install_error_handlers


def _app(exc: Exception) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise exc

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("exc", [nats.errors.TimeoutError(), nats.errors.NoServersError(), TimeoutError("kv")])
def test_the_bus_not_answering_is_a_503_to_retry(exc: Exception) -> None:
    r = _app(exc).get("/boom")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "bus_unavailable" and "retry" in r.json()["error"]["message"]


def test_a_bug_is_a_500_without_a_trace() -> None:
    r = _app(KeyError("x")).get("/boom")
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert "Traceback" not in r.text
