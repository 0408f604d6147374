"""shared.tracing: off by default, on from the standard OTEL_* variables, W3C context over headers."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared import tracing

OTEL_VARS = (
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SDK_DISABLED",
    "OTEL_SERVICE_NAME",
)


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)
    tracing.install(None)
    yield
    tracing.install(None)


@pytest.fixture
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    return exporter


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://jaeger:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, False),
    ],
)
def test_configured_only_by_the_standard_variables(env: dict[str, str], on: bool) -> None:
    assert tracing.configured(env) is on


def test_off_by_default_is_a_no_op() -> None:
    assert tracing.setup("encoder") is False
    assert not tracing.enabled()
    with tracing.span("x", {"a": 1}) as sp:
        assert sp is None
    with tracing.transfer("pull", "tcp", 10):
        pass
    headers = {"Nats-Msg-Id": "r:n:1"}
    assert tracing.inject(headers) is headers and headers == {"Nats-Msg-Id": "r:n:1"}
    assert tracing.extract({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}) is None
    scope = tracing.begin("request")
    assert scope.span is None and scope.headers == {}
    scope.close({"lego.status": "succeeded"})

    def fn() -> int:
        return 1

    assert tracing.carry(fn) is fn

    async def coro() -> int:
        return 1

    c = coro()
    assert tracing.bind(c) is c
    c.close()
    tracing.record("queue.wait", 1.0, 2.0)
    tracing.event("tensor.put", {"tensor.bytes": 1})


def test_setup_from_env_uses_otlp_http_and_the_service_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    assert tracing.setup("vae") is True
    provider = tracing._provider
    assert provider is not None and provider.resource.attributes["service.name"] == "vae"
    exporters = [p.span_exporter for p in provider._active_span_processor._span_processors]
    assert [type(e).__name__ for e in exporters] == ["OTLPSpanExporter"]
    assert tracing.setup("vae") is True  # idempotent
    tracing.shutdown()  # nothing batched: no connection attempted
    assert not tracing.enabled()

    monkeypatch.setenv("OTEL_SERVICE_NAME", "vae-gpu")
    tracing.setup("vae")
    assert tracing._provider is not None and tracing._provider.resource.attributes["service.name"] == "vae-gpu"
    tracing.shutdown()


def test_traceparent_round_trip_through_headers(spans: InMemorySpanExporter) -> None:
    with tracing.span("generate sd3") as parent:
        headers = tracing.inject({"Nats-Msg-Id": "r:n:1"})
    assert headers["Nats-Msg-Id"] == "r:n:1"
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", headers["traceparent"])
    ctx = tracing.extract(headers)
    assert ctx is not None
    with tracing.span("encode clip-l", {"lego.node_id": "clip_l"}, parent=ctx):
        pass
    child = spans.get_finished_spans()[-1]
    assert parent is not None
    assert child.context.trace_id == parent.get_span_context().trace_id
    assert child.parent is not None and child.parent.span_id == parent.get_span_context().span_id
    assert child.attributes["lego.node_id"] == "clip_l"
    assert tracing.extract({}) is None and tracing.extract(None) is None


def test_transfer_queue_wait_and_scope(spans: InMemorySpanExporter) -> None:
    scope = tracing.begin("generate sd3", {"lego.workflow": "sd3"})
    assert "traceparent" in scope.headers
    with tracing.transfer("pull", "shm", 4096, "tcp://127.0.0.1:1"):
        tracing.event("tensor.put", {"tensor.bytes": 4096})
    tracing.record("queue.wait", 100.0, 100.5, {"lego.kind": "encode"}, parent=tracing.extract(scope.headers))
    scope.close({"lego.status": "failed"}, error="step_failed")
    assert scope.span is None
    by_name = {s.name: s for s in spans.get_finished_spans()}
    root, pull, wait = by_name["generate sd3"], by_name["tensor.pull"], by_name["queue.wait"]
    assert root.parent is None and root.attributes["lego.status"] == "failed"
    assert root.status.status_code.name == "ERROR"
    assert pull.parent is not None and pull.parent.span_id == root.context.span_id
    assert pull.attributes["tensor.bytes"] == 4096 and pull.attributes["tensor.transport"] == "shm"
    assert pull.attributes["tensor.seconds"] >= 0
    assert [e.name for e in pull.events] == ["tensor.put"]
    assert wait.parent is not None and wait.parent.span_id == root.context.span_id
    assert wait.start_time == 100_000_000_000 and wait.end_time == 100_500_000_000
    with tracing.span("after") as after:  # the scope no longer current
        assert after is not None and after.parent is None


def test_context_crosses_to_compute_threads_and_back_to_the_loop(spans: InMemorySpanExporter) -> None:
    async def remote_call() -> str:
        with tracing.span("controlnet sd3-controlnet"):
            return tracing.inject()["traceparent"]

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def compute() -> str:
            assert threading.current_thread() is not threading.main_thread()
            with tracing.span("inside compute"):
                return asyncio.run_coroutine_threadsafe(tracing.bind(remote_call()), loop).result(5)

        with tracing.span("denoise sd3-transformer"), ThreadPoolExecutor(1) as pool:
            await loop.run_in_executor(pool, tracing.carry(compute))

    asyncio.run(main())
    by_name = {s.name: s for s in spans.get_finished_spans()}
    denoise, inner, cn = (
        by_name["denoise sd3-transformer"],
        by_name["inside compute"],
        by_name["controlnet sd3-controlnet"],
    )
    assert inner.parent is not None and inner.parent.span_id == denoise.context.span_id
    assert cn.parent is not None and cn.parent.span_id == inner.context.span_id
    assert len({denoise.context.trace_id, inner.context.trace_id, cn.context.trace_id}) == 1
