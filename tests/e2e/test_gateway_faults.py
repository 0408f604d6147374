"""kill -9 one gateway of two with requests in flight: nothing is lost, nothing generated twice.

Two gateways join the shared mesh's bus. Half the requests are synchronous: posted to the
victim with an Idempotency-Key, and when the connection breaks sent again, with the same key,
to the survivor. The other half are asynchronous: posted to the victim (`wait: false`, an
Idempotency-Key too, in case the 202 is lost) and polled on the survivor. Then the victim is
killed with SIGKILL mid-flight. Every request must end succeeded, with its images, and the
denoisers must have run exactly one denoising loop a request (their step counters).

`LEGO_FAULT_REQUESTS` requests (20 by default, for CI; `make faults` runs 200). Marker `faults`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from dataclasses import dataclass, field

import httpx
import pytest

from lego.launcher import Child, Mesh, free_port
from shared.bus import Bus
from shared.presence import live_replicas
from tests.e2e.test_edits import picture, png, right_half_transparent
from tests.e2e.test_observability import scrape, value
from tests.e2e.test_progress_control import _events
from tests.waiting import wait_for

pytestmark = pytest.mark.faults
REQUESTS = int(os.environ.get("LEGO_FAULT_REQUESTS", "20"))
BODY = {"prompt": "a lighthouse in fog", "size": "64x64", "num_inference_steps": 4, "guidance_scale": 5.0}
FINISH_S = 240.0  # every request must have ended by then


@dataclass
class Tally:
    done: int = 0
    errors: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    retried: int = 0


def _start_gateway(mesh: Mesh, name: str) -> tuple[Child, str]:
    port = free_port()
    child = mesh.add_gateway(name, port, auth=False)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert child.alive(), f"{name} exited; see {name}.log"
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(f"{name} to be ready", ready, timeout_s=120)
    return child, url


def _denoise_loops(mesh: Mesh) -> float:
    """Denoising loops every SD3 denoiser replica finished (each request runs one)."""

    async def urls() -> set[str]:
        bus = Bus(mesh.settings(), name="test-gateway-faults")
        await bus.connect()
        try:
            return {r.metrics_url for r in await live_replicas(bus) if r.model_id == "sd3-transformer"}
        finally:
            await bus.close()

    found = asyncio.run(urls())
    assert found, "no SD3 denoiser is announced"
    return sum(value(scrape(url), "lego_steps_total", kind="denoise", outcome="ok") for url in found)


async def _sync_client(
    client: httpx.AsyncClient, victim: str, survivor: str, i: int, tally: Tally, slow: bool = False
) -> None:
    """POST and wait; on a broken connection (or a draining gateway's 503), the same again,
    same key, on the survivor. `slow`: a request of seconds (512x512, 30 steps)."""
    headers = {"Idempotency-Key": f"fault-sync-{i}-{uuid.uuid4().hex[:8]}"}
    body = {**BODY, "seed": 1000 + i, **({"size": "512x512", "num_inference_steps": 30} if slow else {})}
    for url in (victim, survivor, survivor):
        try:
            r = await client.post(f"{url}/v1/images/generations", json=body, headers=headers, timeout=FINISH_S)
        except httpx.HTTPError:
            tally.retried += 1
            continue
        if r.status_code == 503:  # draining: the request goes on elsewhere; ask another gateway
            tally.retried += 1
            continue
        if r.status_code == 200 and len(r.json()["data"]) == 1:
            tally.done += 1
        else:
            tally.errors.append(f"sync {i}: {r.status_code} {r.text[:200]}")
        return
    tally.lost.append(f"sync {i}: no answer")


async def _async_client(client: httpx.AsyncClient, victim: str, survivor: str, i: int, tally: Tally) -> None:
    """POST with `wait: false` to the victim (the survivor if that breaks), then poll the survivor."""
    headers = {"Idempotency-Key": f"fault-async-{i}-{uuid.uuid4().hex[:8]}"}
    body = {**BODY, "seed": 5000 + i, "wait": False}
    request_id = None
    for url in (victim, survivor):
        try:
            r = await client.post(f"{url}/v1/images/generations", json=body, headers=headers, timeout=60)
        except httpx.HTTPError:
            tally.retried += 1
            continue
        if r.status_code == 202:
            request_id = r.json()["request_id"]
            break
    if request_id is None:
        tally.lost.append(f"async {i}: never accepted")
        return
    give_up = time.monotonic() + FINISH_S
    while time.monotonic() < give_up:
        try:
            r = await client.get(f"{survivor}/v1/requests/{request_id}", timeout=30)
        except httpx.HTTPError:
            await asyncio.sleep(0.5)
            continue
        if r.status_code == 200 and r.json()["status"] != "running":
            status = r.json()
            if status["status"] == "succeeded" and len(status.get("data", [])) == 1:
                tally.done += 1
            else:
                tally.errors.append(f"async {i}: {status['status']} {status.get('error')}")
            return
        if r.status_code not in (200,):
            tally.errors.append(f"async {i}: GET {r.status_code} {r.text[:200]}")
            return
        await asyncio.sleep(0.3)
    tally.lost.append(f"async {i}: still running after {FINISH_S:.0f}s")


async def _run(victim_child: Child, victim: str, survivor: str, n: int) -> Tally:
    tally = Tally()
    limits = httpx.Limits(max_connections=2 * n + 10)
    async with httpx.AsyncClient(limits=limits) as client:
        tasks = [
            asyncio.create_task((_sync_client if i % 2 == 0 else _async_client)(client, victim, survivor, i, tally))
            for i in range(n)
        ]
        await asyncio.sleep(1.5)  # all posted; the first few done, most in flight
        victim_child.signal_group(signal.SIGKILL)
        await asyncio.gather(*tasks)
    return tally


@pytest.fixture(scope="module")
def survivor(mesh: Mesh) -> str:
    """A gateway that stays up: it adopts what the others leave."""
    return _start_gateway(mesh, "gateway-survivor")[1]


def test_any_gateway_follows_and_cancels_a_request_another_drives(mesh: Mesh, survivor: str) -> None:
    body = {**BODY, "num_inference_steps": 8, "seed": 77, "wait": False}
    accepted = httpx.post(f"{mesh.url}/v1/images/generations", json=body, timeout=30)
    assert accepted.status_code == 202, accepted.text
    events = _events(survivor + accepted.json()["events_url"])  # streamed by the gateway that does not drive it
    assert events[0]["type"] == "queued" and events[-1]["type"] == "result"
    assert [e["step"] for e in events if e["type"] == "progress"] == list(range(1, 9))
    status = httpx.get(survivor + accepted.json()["status_url"], timeout=30).json()
    assert status["status"] == "succeeded" and status["data"] == events[-1]["data"]

    long = {"prompt": "a long night", "size": "512x512", "num_inference_steps": 100, "seed": 78, "wait": False}
    accepted = httpx.post(f"{mesh.url}/v1/images/generations", json=long, timeout=30)
    status_url = survivor + accepted.json()["status_url"]
    wait_for("denoising to start", lambda: httpx.get(status_url, timeout=10).json()["step"] >= 1, timeout_s=120)
    cancelled = httpx.delete(status_url, timeout=30)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
    driver = httpx.get(mesh.url + accepted.json()["status_url"], timeout=10).json()
    assert driver["status"] == "cancelled" and driver["error"]["code"] == "cancelled"


def test_a_retry_with_its_idempotency_key_gets_the_same_request_on_any_gateway(mesh: Mesh, survivor: str) -> None:
    loops_before = _denoise_loops(mesh)
    key = {"Idempotency-Key": f"retry-{uuid.uuid4().hex}"}
    body = {**BODY, "size": "512x512", "num_inference_steps": 30, "seed": 99}  # seconds: 0.1 s a step
    with pytest.raises(httpx.TimeoutException):  # the client gives up: its connection is gone
        httpx.post(f"{mesh.url}/v1/images/generations", json=body, headers=key, timeout=0.3)
    again = httpx.post(f"{survivor}/v1/images/generations", json=body, headers=key, timeout=120)
    assert again.status_code == 200, again.text
    once_more = httpx.post(f"{mesh.url}/v1/images/generations", json=body, headers=key, timeout=120)
    assert once_more.status_code == 200 and once_more.json()["data"] == again.json()["data"]
    assert again.json()["request_id"] == once_more.json()["request_id"]
    other = httpx.post(f"{survivor}/v1/images/generations", json={**body, "seed": 100}, headers=key, timeout=30)
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert _denoise_loops(mesh) - loops_before == 1  # generated once


def test_a_retried_edit_with_its_idempotency_key_gets_the_same_request_on_any_gateway(
    mesh: Mesh, survivor: str
) -> None:
    loops_before = _denoise_loops(mesh)
    key = {"Idempotency-Key": f"edit-retry-{uuid.uuid4().hex}"}
    image = png(picture(512, 512))
    files = {"image": ("image.png", image, "image/png"), "mask": ("mask.png", right_half_transparent(512, 512))}
    form = {"prompt": "a lighthouse in fog", "size": "512x512", "num_inference_steps": "30", "seed": "99"}
    edits = "/v1/images/edits"
    with pytest.raises(httpx.TimeoutException):  # the client gives up: its connection is gone
        httpx.post(mesh.url + edits, data=form, files=files, headers=key, timeout=0.3)
    again = httpx.post(survivor + edits, data=form, files=files, headers=key, timeout=120)  # a new multipart boundary
    assert again.status_code == 200, again.text
    once_more = httpx.post(mesh.url + edits, data=form, files=files, headers=key, timeout=120)
    assert once_more.status_code == 200 and once_more.json()["data"] == again.json()["data"]
    assert again.json()["request_id"] == once_more.json()["request_id"]
    other_image = {**files, "image": ("image.png", png(picture(512, 512)[::-1].copy()), "image/png")}
    for url, other in (
        (survivor, {"data": form, "files": other_image}),
        (mesh.url, {"data": form, "files": {"image": files["image"]}}),
    ):
        refused = httpx.post(url + edits, **other, headers=key, timeout=30)  # another image; no mask
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "idempotency_key_reused"
    generation = httpx.post(f"{survivor}/v1/images/generations", json=BODY, headers=key, timeout=30)
    assert generation.status_code == 422, generation.text  # the key names an edit
    bad = httpx.post(survivor + edits, data=form, files=files, headers={"Idempotency-Key": "has space"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_idempotency_key"
    assert _denoise_loops(mesh) - loops_before == 1  # edited once


def test_kill_9_of_one_gateway_loses_nothing_and_generates_nothing_twice(mesh: Mesh, survivor: str) -> None:
    victim_child, victim = _start_gateway(mesh, "gateway-victim")
    loops_before = _denoise_loops(mesh)

    started = time.monotonic()
    tally = asyncio.run(_run(victim_child, victim, survivor, REQUESTS))
    wait_for("the victim to be gone", lambda: not victim_child.alive(), timeout_s=10)
    loops = _denoise_loops(mesh) - loops_before
    duplicated = max(0, int(loops) - REQUESTS)
    print(
        f"\ngateway kill -9, {REQUESTS} requests in {time.monotonic() - started:.1f}s: done {tally.done} / "
        f"errors {len(tally.errors)} / lost {len(tally.lost)} / duplicated {duplicated} "
        f"(denoising loops {loops:.0f}, client retries {tally.retried})"
    )
    assert not tally.lost, tally.lost[:5]
    assert not tally.errors, tally.errors[:5]
    assert tally.done == REQUESTS
    assert duplicated == 0 and loops == REQUESTS


async def _drain_run(child: Child, drained: str, survivor: str, n: int) -> tuple[Tally, list[int]]:
    """`n` requests on `drained` (sync ones kept connected, async ones polled on the survivor),
    SIGTERM mid-flight; the probe answers seen while it drains."""
    tally, probes = Tally(), []
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=2 * n + 10)) as client:
        # Request 0 runs for seconds, so the gateway still has one in flight when SIGTERM comes
        # and drains for a while: tiny requests alone may all be done by then, on a fast box,
        # and a gateway with nothing in flight exits before any probe can see its 503.
        tasks = [asyncio.create_task(_sync_client(client, drained, survivor, 0, tally, slow=True))]
        tasks += [
            asyncio.create_task((_sync_client if i % 2 == 0 else _async_client)(client, drained, survivor, i, tally))
            for i in range(1, n)
        ]
        await asyncio.sleep(1.5)
        child.signal_group(signal.SIGTERM)
        for _ in range(20):  # what a balancer's health check sees
            try:
                probes.append((await client.get(f"{drained}/healthz", timeout=2)).status_code)
            except httpx.HTTPError:
                break
            await asyncio.sleep(0.1)
        await asyncio.gather(*tasks)
    return tally, probes


def test_sigterm_drains_a_gateway_without_losing_or_repeating_a_request(mesh: Mesh, survivor: str) -> None:
    n = max(4, REQUESTS // 2)
    child, drained = _start_gateway(mesh, "gateway-drained")
    loops_before = _denoise_loops(mesh)
    tally, probes = asyncio.run(_drain_run(child, drained, survivor, n))
    wait_for("the drained gateway to exit", lambda: not child.alive(), timeout_s=60)
    loops = _denoise_loops(mesh) - loops_before
    print(
        f"\ngateway SIGTERM, {n} requests: done {tally.done} / errors {len(tally.errors)} / lost {len(tally.lost)} / "
        f"duplicated {max(0, int(loops) - n)} (client retries {tally.retried}, health probes {probes})"
    )
    assert 503 in probes, probes  # the balancer is told to route away while it drains
    assert not tally.lost and not tally.errors, (tally.lost + tally.errors)[:5]
    assert tally.done == n and loops == n
