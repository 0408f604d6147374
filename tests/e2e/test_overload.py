"""A request that cannot finish in time is refused at once (429 + Retry-After), not left to time out.

One denoiser replica, a queue of long requests ahead: a request whose `timeout_s` is shorter
than the queued work gets 429 with a Retry-After and a reason naming the busy model; one with
time enough is accepted.
"""

from __future__ import annotations

import math

import httpx
import pytest

from lego.launcher import Mesh
from tests.waiting import wait_for

LONG = {"prompt": "a long exposure of a city at night", "size": "512x512", "num_inference_steps": 80}  # ~2 s here


@pytest.fixture(scope="module")
def one_denoiser(sd3_tcp_mesh: Mesh) -> Mesh:
    """One sd3 denoiser replica: the session's sd3 mesh (its transport does not matter here)."""
    return sd3_tcp_mesh


def _denoise_load(mesh: Mesh) -> dict:
    status = httpx.get(f"{mesh.url}/v1/status", timeout=10).json()
    [denoise] = [c for c in status["consumers"] if c["kind"] == "denoise" and c["model_id"] == "sd3-transformer"]
    return denoise


def _steps_done(mesh: Mesh) -> int:
    """Steps the sd3 denoiser replica has done, as its latest heartbeat says."""
    models = httpx.get(f"{mesh.url}/v1/models", timeout=10).json()["models"]
    return sum(r["steps_done"] for m in models if m["model_id"] == "sd3-transformer" for r in m["replicas"])


def test_a_request_that_cannot_make_its_deadline_is_refused_with_retry_after(one_denoiser: Mesh) -> None:
    url = f"{one_denoiser.url}/v1/images/generations"
    before = _steps_done(one_denoiser)
    r = httpx.post(url, json={**LONG, "seed": 1}, timeout=300)  # the replica learns what a step costs
    assert r.status_code == 200, r.text
    # Its heartbeat after that step carries the measured step time (0 before any step).
    wait_for("the long step in the replica's heartbeat", lambda: _steps_done(one_denoiser) > before, 30)
    step_s = wait_for("a measured denoise step time", lambda: _denoise_load(one_denoiser)["seconds_per_item"], 30)
    # The step time is a moving average: where shorter requests ran on this replica before (the
    # other tests of the shared mesh), it is still below a long request's cost, so more long
    # requests are queued: a backlog of at least 4, and over 3 s of work as the gateway counts it
    # (backlog x step time; a third of it is then a deadline the API takes, >= 1 s).
    need = max(4, math.floor(3 / step_s) + 1)
    queued = []
    try:
        for seed in range(2, 3 + need):  # one more: the first may be done before the last is queued
            r = httpx.post(url, json={**LONG, "seed": seed, "wait": False}, timeout=30)
            assert r.status_code == 202, r.text
            queued.append(r.json()["status_url"])
        load = wait_for(
            f"{need} denoise steps queued", lambda: (d := _denoise_load(one_denoiser))["backlog"] >= need and d, 60
        )
        ahead_s = load["backlog"] * step_s  # what the gateway estimates, at the least
        assert ahead_s > 3, (load, step_s)

        def refused() -> httpx.Response | None:
            """Posted async so that, while the gateway's view (read at most once a second) is
            older than the queue, an accepted request does not block the test."""
            r = httpx.post(url, json={**LONG, "seed": 1000, "timeout_s": ahead_s / 3, "wait": False}, timeout=30)
            if r.status_code == 202:
                queued.append(r.json()["status_url"])
                return None
            return r

        r = wait_for("a 429 once the gateway sees the queue", refused, 15, every_s=0.3)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "overloaded"
        assert "sd3-transformer" in r.json()["error"]["message"]
        assert int(r.headers["Retry-After"]) >= 1

        r = httpx.post(url, json={**LONG, "seed": 1001, "timeout_s": 600, "wait": False}, timeout=30)
        assert r.status_code == 202, r.text  # time enough: accepted
        queued.append(r.json()["status_url"])
    finally:
        for status_url in queued:
            httpx.delete(f"{one_denoiser.url}{status_url}", timeout=30)
