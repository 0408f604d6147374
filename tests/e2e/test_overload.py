"""A request that cannot finish in time is refused at once (429 + Retry-After), not left to time out.

One denoiser replica, a queue of long requests ahead: a request whose `timeout_s` is shorter
than the queued work gets 429 with a Retry-After and a reason naming the busy model; one with
time enough is accepted.
"""

from __future__ import annotations

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


def test_a_request_that_cannot_make_its_deadline_is_refused_with_retry_after(one_denoiser: Mesh) -> None:
    url = f"{one_denoiser.url}/v1/images/generations"
    r = httpx.post(url, json={**LONG, "seed": 1}, timeout=300)  # the replica learns what a step costs
    assert r.status_code == 200, r.text
    step_s = wait_for("a measured denoise step time", lambda: _denoise_load(one_denoiser)["seconds_per_item"], 30)
    queued = []
    try:
        for seed in range(2, 7):
            r = httpx.post(url, json={**LONG, "seed": seed, "wait": False}, timeout=30)
            assert r.status_code == 202, r.text
            queued.append(r.json()["status_url"])
        load = wait_for("5 denoise steps queued", lambda: (d := _denoise_load(one_denoiser))["backlog"] >= 4 and d, 60)
        ahead_s = load["backlog"] * step_s  # what the gateway estimates, at the least
        assert ahead_s > 2, (load, step_s)

        def refused() -> httpx.Response | None:
            """Posted async so that, while the gateway's view (read at most once a second) is
            older than the queue, an accepted request does not block the test."""
            r = httpx.post(url, json={**LONG, "seed": 9, "timeout_s": ahead_s / 3, "wait": False}, timeout=30)
            if r.status_code == 202:
                queued.append(r.json()["status_url"])
                return None
            return r

        r = wait_for("a 429 once the gateway sees the queue", refused, 15, every_s=0.3)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "overloaded"
        assert "sd3-transformer" in r.json()["error"]["message"]
        assert int(r.headers["Retry-After"]) >= 1

        r = httpx.post(url, json={**LONG, "seed": 10, "timeout_s": 600, "wait": False}, timeout=30)
        assert r.status_code == 202, r.text  # time enough: accepted
        queued.append(r.json()["status_url"])
    finally:
        for status_url in queued:
            httpx.delete(f"{one_denoiser.url}{status_url}", timeout=30)
