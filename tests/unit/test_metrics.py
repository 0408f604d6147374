"""shared.metrics: Prometheus text that parses, counters that move, no GPU without error."""

from __future__ import annotations

import asyncio
import sys
import types
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared import metrics


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(text: str, metric: str, /, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


class FakePlane:
    def __init__(self) -> None:
        self.stats = {
            "put": {"shm": {"count": 2, "bytes": 300}},
            "fetched": {"tcp": {"count": 1, "bytes": 1000}, "inline": {"count": 3, "bytes": 30}},
            "stored": {"count": 2, "bytes": 300},
        }


class FakeRunner:
    model_id = "sd3-transformer"
    kinds = ("denoise",)

    def status(self) -> dict[str, Any]:
        return {"param_bytes": 1234, "loras": ["a", "b"]}


def test_text_parses_and_step_counters_move() -> None:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    before = sample(body.decode(), "lego_steps_total", kind="vae_decode", model="m-test", outcome="ok") or 0.0
    step = metrics.StepMetrics("vae_decode", "m-test")
    step.queue_wait.observe(0.01)
    step.batch.observe(1)
    step.finished("ok", 0.2)
    step.finished("ok", 0.3)
    text = metrics.render()[0].decode()
    found = families(text)
    for name in ("lego_steps", "lego_step_seconds", "lego_queue_wait_seconds", "lego_batch_size", "lego_requests"):
        assert name in found, name
    assert sample(text, "lego_steps_total", kind="vae_decode", model="m-test", outcome="ok") == before + 2
    assert sample(text, "lego_step_seconds_count", kind="vae_decode", model="m-test", outcome="ok") >= 2
    assert sample(text, "lego_batch_size_bucket", kind="vae_decode", model="m-test", le="1.0") >= 1
    assert "process_resident_memory_bytes" in found or sys.platform != "linux"


def test_plane_models_and_no_gpu_are_read_at_scrape_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import pynvml

    def no_driver() -> None:
        raise pynvml.NVMLError_LibraryNotFound()

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    monkeypatch.setattr(metrics.SOURCES, "planes", metrics.weakref.WeakSet())
    monkeypatch.setattr(metrics.SOURCES, "runners", [])
    monkeypatch.setattr(metrics.SOURCES, "gpus", None)
    plane = FakePlane()
    metrics.watch_plane(plane)
    metrics.watch_models([FakeRunner()], "cpu")
    assert metrics.SOURCES.gpus is not None and metrics.SOURCES.gpus.count == 0
    assert "no GPU" in metrics.SOURCES.gpus.reason
    text = metrics.render()[0].decode()
    assert sample(text, "lego_tensor_bytes_total", direction="fetched", transport="tcp") == 1000
    assert sample(text, "lego_tensor_transfers_total", direction="put", transport="shm") == 2
    assert sample(text, "lego_tensors_held_bytes") == 300
    assert sample(text, "lego_model_loaded", model="sd3-transformer", kind="denoise", device="cpu") == 1
    assert sample(text, "lego_model_param_bytes", model="sd3-transformer") == 1234
    assert sample(text, "lego_model_loras", model="sd3-transformer") == 2
    assert sample(text, "lego_gpus") == 0
    assert "lego_gpu_memory_used_bytes" not in families(text)
    plane.stats["fetched"]["tcp"] = {"count": 2, "bytes": 5000}
    assert sample(metrics.render()[0].decode(), "lego_tensor_bytes_total", direction="fetched", transport="tcp") == 5000


def test_gpu_gauges_where_nvml_sees_one(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=2 * 2**30, total=80 * 2**30),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=37),
        nvmlDeviceGetName=lambda h: b"NVIDIA H100",
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(metrics.SOURCES, "gpus", metrics.GpuProbe())
    text = metrics.render()[0].decode()
    assert sample(text, "lego_gpus") == 1
    assert sample(text, "lego_gpu_memory_used_bytes", gpu="0", name="NVIDIA H100") == 2 * 2**30
    assert sample(text, "lego_gpu_utilization_ratio", gpu="0") == pytest.approx(0.37)


def test_metrics_server_serves_metrics_and_healthz_then_stops() -> None:
    server = metrics.MetricsServer()
    port = server.start("127.0.0.1", 0)
    url = server.url("127.0.0.1")
    assert url == f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        assert "lego_steps" in families(resp.read().decode())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        assert resp.status == 200
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=5)
    assert err.value.code == 404
    server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)


def test_backlog_is_sampled_until_stop() -> None:
    calls: list[tuple[str, str]] = []

    async def backlog(kind: str, model: str) -> tuple[int, int] | None:
        calls.append((kind, model))
        return (7, 1) if model == "m-backlog" else None

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(metrics.sample_backlog(backlog, [("encode", "m-backlog"), ("encode", "x")], stop))
        while len(calls) < 2:
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    text = metrics.render()[0].decode()
    assert sample(text, "lego_backlog_steps", kind="encode", model="m-backlog", state="pending") == 7
    assert sample(text, "lego_backlog_steps", kind="encode", model="m-backlog", state="ack_pending") == 1


def test_requests_are_counted_by_priority_band() -> None:
    text = metrics.render()[0].decode()
    before = sample(text, "lego_priority_requests_total", band="high", status="succeeded") or 0.0
    metrics.request_started("wf-test")
    metrics.request_finished("wf-test", "succeeded", 1.0, priority=9)
    metrics.request_refused("wf-test", "overloaded", priority=0)
    text = metrics.render()[0].decode()
    assert sample(text, "lego_priority_requests_total", band="high", status="succeeded") == before + 1
    assert (sample(text, "lego_priority_requests_total", band="normal", status="overloaded") or 0) >= 1
