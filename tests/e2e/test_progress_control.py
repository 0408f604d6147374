"""Progress and control as users of ComfyUI-style servers expect: async submission, status with
queue position and step progress, server-sent events that end with the result, and cancel."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from shared.bus import Bus
from shared.presence import live_replicas
from tests.oracle import png_to_array
from tests.waiting import wait_for

PROMPT = "a paper boat on a pond"


def _events(url: str, timeout: float = 300) -> list[dict]:
    """Read a server-sent event stream to its end; each event's `type` must match its `event:` line."""
    out = []
    with httpx.stream("GET", url, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                event = json.loads(line.removeprefix("data: "))
                assert event["type"] == kind
                out.append(event)
    return out


def test_async_request_streams_ordered_progress_and_ends_with_the_result(mesh):
    body = {"prompt": PROMPT, "size": "96x64", "num_inference_steps": 6, "seed": 31, "guidance_scale": 5.0}
    r = httpx.post(f"{mesh.url}/v1/images/generations", json={**body, "wait": False}, timeout=30)
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["status"] == "running" and accepted["seed"] == 31
    events = _events(mesh.url + accepted["events_url"])

    assert events[0]["type"] == "queued"
    assert [e["seq"] for e in events] == list(range(len(events)))
    steps = [e["step"] for e in events if e["type"] == "progress"]
    assert steps == list(range(1, 7)), steps  # every step, in order
    done = [e["node"] for e in events if e["type"] == "node" and e["state"] == "done"]
    assert set(done) == {"clip_l", "clip_g", "t5", "denoise", "decode"}
    assert done.index("denoise") > max(done.index(n) for n in ("clip_l", "clip_g", "t5"))
    assert done[-1] == "decode"
    final = events[-1]
    assert final["type"] == "result" and len(final["data"]) == 1

    # The status has the same images, and they equal what a synchronous call gives.
    status = httpx.get(mesh.url + accepted["status_url"], timeout=30).json()
    assert status["status"] == "succeeded" and status["step"] == status["total_steps"] == 6
    assert status["data"] == final["data"] and status["queue_position"] == 0
    sync = httpx.post(f"{mesh.url}/v1/images/generations", json=body, timeout=300).json()
    assert (png_to_array(sync["data"][0]["b64_json"]) == png_to_array(final["data"][0]["b64_json"])).all()


async def _held_tensors(mesh) -> int:
    bus = Bus(mesh.settings(), name="test-held")
    await bus.connect()
    try:
        return sum({r.replica_id: r.tensors_held for r in await live_replicas(bus)}.values())
    finally:
        await bus.close()


def _cancelled_denoise_steps(metrics_url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(metrics_url, timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "lego_steps_total"
                and labels.get("kind") == "denoise"
                and labels["outcome"] == "cancelled"
            ):
                return sample.value
    return 0.0


def test_cancel_stops_the_denoiser_within_a_step_or_two_and_frees_tensors(mesh):
    body = {"prompt": PROMPT, "size": "512x512", "n": 4, "num_inference_steps": 100, "seed": 8, "wait": False}
    r = httpx.post(f"{mesh.url}/v1/images/generations", json=body, timeout=30)
    assert r.status_code == 202, r.text
    status_url = mesh.url + r.json()["status_url"]
    wait_for("denoising to start", lambda: httpx.get(status_url, timeout=10).json()["step"] >= 4, 120)
    replica = httpx.get(status_url, timeout=10).json()["replicas"]["denoise"]
    models = httpx.get(f"{mesh.url}/v1/models", timeout=10).json()["models"]
    [sd3] = [m for m in models if m["model_id"] == "sd3-transformer"]
    metrics_url = next(x for x in sd3["replicas"] if x["replica_id"] == replica)["metrics_url"]
    cancelled_before = _cancelled_denoise_steps(metrics_url)

    t0 = time.monotonic()
    r = httpx.delete(status_url, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled"
    assert r.json()["error"]["code"] == "cancelled"
    at_cancel = r.json()["step"]
    # How long one denoising step takes here, from the request's own progress events.
    progress = [e for e in _events(status_url + "/events", timeout=30) if e["type"] == "progress"]
    step_s = (progress[-1]["elapsed_s"] - progress[0]["elapsed_s"]) / max(1, len(progress) - 1)

    # The denoiser leaves its loop (answering the step `cancelled`) within a step or two, far
    # sooner than the rest of the loop would take.
    wait_for(
        "the denoiser to end the step as cancelled",
        lambda: _cancelled_denoise_steps(metrics_url) > cancelled_before,
        60,
    )
    stopped_after = time.monotonic() - t0
    remaining = (100 - at_cancel) * step_s
    print(f"cancel: stopped {stopped_after:.2f}s after DELETE; one step takes {step_s:.3f}s")
    assert stopped_after < 2 * step_s + 1.5, (stopped_after, step_s)
    assert remaining > 2 * (2 * step_s + 1.5), "the request is too short to tell a cancel from completion"
    final = httpx.get(status_url, timeout=10).json()
    assert final["status"] == "cancelled" and final["step"] < 100
    # ...and every service frees what it held for the request.
    wait_for("tensors to be freed", lambda: asyncio.run(_held_tensors(mesh)) == 0, 30)

    # Its event stream ends with the cancellation; a second cancel is refused.
    events = _events(status_url + "/events", timeout=30)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "cancelled"
    assert all(e["type"] != "result" for e in events)
    r = httpx.delete(status_url, timeout=30)
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_running"
    # The mesh serves on.
    r = httpx.post(f"{mesh.url}/v1/images/generations", json={"prompt": "ok", "size": "64x64"}, timeout=300)
    assert r.status_code == 200, r.text


def test_queue_position_counts_requests_ahead_for_the_same_base(mesh):
    """Three long requests at once on an SD3 mesh with two SD3 replicas: the third waits."""
    urls = []
    for seed in range(3):
        body = {"prompt": PROMPT, "size": "256x256", "num_inference_steps": 60, "seed": seed, "wait": False}
        r = httpx.post(f"{mesh.url}/v1/images/generations", json=body, timeout=30)
        assert r.status_code == 202, r.text
        urls.append(mesh.url + r.json()["status_url"])
    try:
        third = wait_for(
            "a queue position", lambda: (s := httpx.get(urls[2], timeout=10).json())["queue_position"] > 0 and s, 60
        )
        assert third["status"] == "running" and third["step"] == 0
        assert third["queue_position"] <= 2
    finally:
        for url in urls:
            httpx.delete(url, timeout=30)


def test_cancel_of_unknown_request_is_404(mesh):
    r = httpx.delete(f"{mesh.url}/v1/requests/nope", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_request"
    r = httpx.get(f"{mesh.url}/v1/requests/nope/events", timeout=10)
    assert r.status_code == 404
