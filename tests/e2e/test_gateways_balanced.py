"""Two gateways behind the local balancer (`lego up --gateways 2`), on the shared mesh: requests
are spread over both, a progress stream passes through, and when one gateway is killed -9 new
requests still succeed through the balancer. (What happens to requests the dead gateway held is
the gateway's own business: tests of its leases and takeover.)"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import httpx

from lego.balancer import STATUS_PATH
from lego.launcher import Child, Mesh, free_port
from tests.waiting import wait_for

BODY = {"prompt": "a lantern in the fog", "size": "64x64", "num_inference_steps": 2, "seed": 5}


def _backends(url: str) -> list[dict]:
    return httpx.get(f"{url}{STATUS_PATH}", timeout=10).json()["backends"]


def _generate(url: str) -> httpx.Response:
    """A new connection each time (no shared client): the balancer picks a gateway per connection."""
    return httpx.post(f"{url}/v1/images/generations", json=BODY, timeout=300)


def _stop(children: list[Child]) -> None:
    for child in children:
        child.signal_group(signal.SIGTERM)
    for child in children:
        if child.proc is not None:
            try:
                child.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.signal_group(signal.SIGKILL)
                child.proc.wait(timeout=10)


def test_two_gateways_behind_the_balancer_and_one_killed(mesh: Mesh) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gateways = mesh.add_gateways(2, port, auth=False, prefix="balanced")
    balancer = mesh.children[-1]
    assert balancer.name == "balanced-balancer"
    try:

        def both_in_rotation() -> bool:
            assert all(c.alive() for c in [*gateways, balancer]), "a gateway or the balancer exited; see their logs"
            try:
                return all(b["healthy"] for b in _backends(url))
            except (httpx.HTTPError, ValueError):
                return False

        wait_for("both gateways in the balancer's rotation", both_in_rotation, timeout_s=120)

        answers = [_generate(url) for _ in range(4)]
        assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
        assert all(b["served"] >= 2 for b in _backends(url)), "round robin: each gateway took connections"

        # A progress stream through the balancer (one keep-alive connection: one gateway).
        with httpx.Client(base_url=url, timeout=300) as client:
            accepted = client.post("/v1/images/generations", json={**BODY, "wait": False})
            assert accepted.status_code == 202, accepted.text
            with client.stream("GET", accepted.json()["events_url"]) as events:
                assert events.headers["content-type"].startswith("text/event-stream")
                kinds = [json.loads(line[6:])["type"] for line in events.iter_lines() if line.startswith("data: ")]
        assert kinds[0] == "queued" and kinds[-1] == "result" and "progress" in kinds, kinds

        # kill -9 one gateway: the next connections are refused there and go to the other one,
        # before and after a health check takes it out of rotation.
        gateways[0].signal_group(signal.SIGKILL)
        assert gateways[0].proc is not None
        gateways[0].proc.wait(timeout=10)
        answers = [_generate(url) for _ in range(4)]
        assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
        dead, alive = _backends(url)
        assert not dead["healthy"] and alive["healthy"]

        # `lego status` lists both gateways and which one is out.
        out = subprocess.run(
            [sys.executable, "-m", "lego.cli", "status", "--url", url], capture_output=True, text=True, timeout=60
        ).stdout
        assert "gateways behind the balancer: 1 in rotation" in out, out
        rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("127.0.0.1:")}
        assert rows == {dead["address"]: "no", alive["address"]: "yes"}, out
    finally:
        _stop([*gateways, balancer])
