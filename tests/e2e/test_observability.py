"""Observability through a real mesh: one request is one trace across the gateway, every encoder,
the denoiser and the VAE (exported over OTLP/HTTP to a small receiver in this process), and
every process serves Prometheus `/metrics` whose counters move as requests run.

The mesh is the session's sd3 one (tests/e2e/conftest.py: sd3_tcp_mesh), started with tracing on
for these tests: the transport and overload tests share it, one mesh start for all three."""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lego.launcher import Mesh
from tests.otlp import OtlpReceiver, Span
from tests.waiting import wait_for

# Every encoder, the denoiser and the VAE of the sd3 workflow: (span name, service.name).
STEP_SPANS = {
    "encode clip-l": "encoder",
    "encode clip-g": "encoder",
    "encode t5": "encoder",
    "denoise sd3-transformer": "denoiser",
    "vae_decode sd3-vae": "vae",
}


@pytest.fixture(scope="module")
def receiver(otlp_receiver: OtlpReceiver) -> OtlpReceiver:
    return otlp_receiver


@pytest.fixture(scope="module")
def mesh(sd3_tcp_mesh: Mesh) -> Mesh:
    """The session's sd3 mesh (and the ControlNet service) with tracing on through the standard
    OTEL_* variables, spans sent every 200 ms; embeddings and latents travel the tensor plane
    (over tcp there), not inline."""
    return sd3_tcp_mesh


def generate(mesh: Mesh, request_id: str, **extra: Any) -> dict[str, Any]:
    r = httpx.post(
        f"{mesh.url}/v1/images/generations",
        json={"prompt": "a red fox", "size": "128x128", "num_inference_steps": 2, "seed": 3, **extra},
        headers={"X-Request-Id": request_id},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_one_request_is_one_trace_across_the_mesh(mesh: Mesh, receiver: OtlpReceiver) -> None:
    generate(mesh, "traced-1")

    def whole_trace() -> tuple[Span, list[Span]] | None:
        spans = receiver.snapshot()
        root = next((s for s in spans if s.attributes.get("lego.request_id") == "traced-1" and not s.parent_id), None)
        if root is None:
            return None
        trace = [s for s in spans if s.trace_id == root.trace_id]
        names = {s.name for s in trace}
        if not set(STEP_SPANS) <= names or not {"tensor.pull", "images.encode"} <= names:
            return None
        return root, trace

    root, trace = wait_for("the request's spans from every service", whole_trace)
    run_id = root.attributes["lego.run_id"]
    assert root.service == "gateway" and root.name == "generate sd3"
    assert root.attributes["lego.workflow"] == "sd3" and root.attributes["lego.status"] == "succeeded"
    # Nothing of this run went to another trace.
    assert {s.trace_id for s in receiver.snapshot() if s.attributes.get("lego.request_id") == run_id} == {root.trace_id}
    by_id = {s.span_id: s for s in trace}
    for name, service in STEP_SPANS.items():
        (step,) = [s for s in trace if s.name == name]
        assert step.service == service, name
        assert step.parent_id == root.span_id, f"{name} is not a child of the request span"
        assert step.attributes["lego.request_id"] == run_id
        assert step.attributes["lego.node_id"] and step.attributes["lego.attempt"] == 1
        assert step.attributes["lego.replica_id"].startswith(service)
        assert step.attributes["lego.queue_wait_s"] >= 0 and step.attributes["lego.outcome"] == "ok"
        (wait,) = [
            s
            for s in trace
            if s.name == "queue.wait" and s.attributes.get("lego.model_id") == step.attributes["lego.model_id"]
        ]
        assert wait.parent_id == root.span_id and wait.service == service
        (run,) = [s for s in trace if s.name == "model.run" and s.parent_id == step.span_id]
        assert run.service == service and 0 < run.duration_s <= step.duration_s
    pulls = [s for s in trace if s.name == "tensor.pull"]
    assert any(p.attributes["tensor.bytes"] > 0 for p in pulls)
    for pull in pulls:
        assert pull.attributes["tensor.transport"] in ("shm", "tcp", "ucx")
        assert pull.attributes["tensor.seconds"] >= 0
        assert pull.parent_id in by_id, "a tensor pull outside the request's spans"
    # The images pulled by the gateway, under the request span; the denoiser pulled the embeddings.
    assert any(p.service == "gateway" and p.parent_id == root.span_id for p in pulls)
    denoise = next(s for s in trace if s.name == "denoise sd3-transformer")
    assert any(p.parent_id == denoise.span_id for p in pulls)
    # The PNG encoding, after the request's span ended, is still under it.
    (encode,) = [s for s in trace if s.name == "images.encode"]
    assert encode.service == "gateway" and encode.parent_id == root.span_id
    assert encode.attributes["lego.images"] == 1


def test_controlnet_steps_nest_under_the_denoise_step(mesh: Mesh, receiver: OtlpReceiver) -> None:
    """The denoiser publishes a ControlNet step per denoising step from its compute thread: those
    carry the denoise span's context, so the adapters' spans are its children."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (128, 128), (200, 40, 40)).save(buf, format="PNG")
    generate(
        mesh, "traced-cn", workflow="sd3-controlnet", controlnet={"image": base64.b64encode(buf.getvalue()).decode()}
    )

    def trace() -> tuple[Span, list[Span]] | None:
        spans = receiver.snapshot()
        root = next((s for s in spans if s.attributes.get("lego.request_id") == "traced-cn" and not s.parent_id), None)
        if root is None:
            return None
        mine = [s for s in spans if s.trace_id == root.trace_id]
        names = [s.name for s in mine]
        return (
            (root, mine)
            if names.count("controlnet sd3-controlnet") >= 2 and "denoise sd3-transformer" in names
            else None
        )

    root, spans = wait_for("the ControlNet steps' spans", trace)
    (denoise,) = [s for s in spans if s.name == "denoise sd3-transformer"]
    assert denoise.parent_id == root.span_id
    controlnet = [s for s in spans if s.name == "controlnet sd3-controlnet"]
    assert {s.service for s in controlnet} == {"adapters"}
    assert all(s.parent_id == denoise.span_id for s in controlnet)
    # Their inputs (latents of each step) came over the tensor plane, inside their spans.
    ids = {s.span_id for s in controlnet}
    assert any(s.name == "tensor.pull" and s.parent_id in ids for s in spans)


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200, url
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def metrics_urls(mesh: Mesh) -> dict[str, str]:
    """model id -> its replica's /metrics URL, from the presence bucket."""
    from shared.bus import Bus
    from shared.presence import live_replicas

    async def read() -> dict[str, str]:
        bus = Bus(mesh.settings(), name="test-observability")
        await bus.connect()
        try:
            return {r.model_id: r.metrics_url for r in await live_replicas(bus)}
        finally:
            await bus.close()

    return asyncio.run(read())


def test_metrics_of_every_process_parse_and_move(mesh: Mesh) -> None:
    generate(mesh, "metered-1")
    gateway = f"{mesh.url}/metrics"
    urls = metrics_urls(mesh)
    assert set(urls) == {"clip-l", "clip-g", "t5", "sd3-transformer", "sd3-vae", "sd3-controlnet"}
    assert all(u.startswith("http://127.0.0.1:") and u.endswith("/metrics") for u in urls.values())
    assert len(set(urls.values())) == 4  # encoder, denoiser, vae, adapters: one endpoint per process
    urls.pop("sd3-controlnet")  # no steps for it in an sd3 request

    before = {url: scrape(url) for url in {gateway, *urls.values()}}
    assert value(before[gateway], "lego_requests_total", workflow="sd3", status="succeeded") >= 1
    assert value(before[gateway], "lego_tensor_bytes_total", direction="fetched") > 0
    for model, url in urls.items():
        samples = before[url]
        assert value(samples, "lego_model_loaded", model=model) >= 1
        assert value(samples, "lego_model_param_bytes", model=model) > 0
        assert value(samples, "lego_steps_total", model=model, outcome="ok") >= 1
        assert value(samples, "lego_queue_wait_seconds_count", model=model) >= 1
        assert value(samples, "lego_batch_size_count", model=model) >= 1
        assert ("lego_gpus", frozenset()) in samples  # 0 here: no GPU, and no error
        assert httpx.get(url.replace("/metrics", "/healthz"), timeout=5).status_code == 200
    wait_for(
        "backlog samples",
        lambda: any(name == "lego_backlog_steps" for name, _ in scrape(urls["sd3-vae"])),
        timeout_s=10,
    )

    generate(mesh, "metered-2")
    vae = urls["sd3-vae"]

    def moved() -> bool:
        now = scrape(vae)
        key = {"model": "sd3-vae", "kind": "vae_decode", "outcome": "ok"}
        return value(now, "lego_steps_total", **key) > value(before[vae], "lego_steps_total", **key) and value(
            now, "lego_tensor_bytes_total", direction="served"
        ) > value(before[vae], "lego_tensor_bytes_total", direction="served")

    wait_for("the vae's counters to move", moved, timeout_s=10)
    after = scrape(gateway)
    assert value(after, "lego_requests_total", workflow="sd3", status="succeeded") > value(
        before[gateway], "lego_requests_total", workflow="sd3", status="succeeded"
    )
    assert value(after, "lego_request_seconds_count", workflow="sd3") >= 2
