"""Traces: a span per request at the gateway, per step in each service, per tensor pull and per
queue wait, one trace across every process, carried in NATS headers as W3C `traceparent`.

Configured only by the OpenTelemetry SDK's own environment variables, so it is on where they
are set (docker-compose sets them; traces go to Jaeger) and off by default:

  OTEL_TRACES_EXPORTER=otlp (or console; "none" turns it off) or an OTLP endpoint
  OTEL_EXPORTER_OTLP_ENDPOINT=http://jaeger:4318 (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)
  OTEL_SERVICE_NAME (default: the service's name), OTEL_BSP_SCHEDULE_DELAY, OTEL_SDK_DISABLED ...

Spans are batched (BatchSpanProcessor) and sent over OTLP/HTTP protobuf. Off, every helper here
returns at once: no OpenTelemetry import, no span objects, the headers dict left as it was.

One tracer provider per process, kept here rather than installed as OpenTelemetry's global
(which can be set only once per process): `install()` swaps it, e.g. for an in-memory exporter.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger("lego.tracing")

T = TypeVar("T")
TRACEPARENT = "traceparent"
EXPORTERS = ("otlp", "console")

_provider: TracerProvider | None = None
_tracer: Tracer | None = None
_NULL: contextlib.nullcontext[None] = contextlib.nullcontext()


def _exporter_names(env: Mapping[str, str]) -> list[str]:
    return [x.strip().lower() for x in env.get("OTEL_TRACES_EXPORTER", "").split(",") if x.strip()]


def configured(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for traces: an exporter named (not "none"), or an OTLP endpoint."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    names = _exporter_names(env)
    if "none" in names:
        return False
    if names:
        return any(n in EXPORTERS for n in names)
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup(service_name: str) -> bool:
    """Turn tracing on for this process when the environment asks for it; returns whether it is on.

    `service_name` names the process's spans unless OTEL_SERVICE_NAME is set. Idempotent.
    """
    if _provider is not None:
        return True
    if not configured():
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    names = _exporter_names(os.environ) or ["otlp"]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        log.warning("OTEL_TRACES_EXPORTER names %s, which this build does not ship; using %s", unknown, EXPORTERS)
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; ours is only the default.
    resource = Resource.create({} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name})
    provider = TracerProvider(resource=resource)
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
                "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
            )
            if protocol != "http/protobuf":
                log.warning("OTLP protocol %r is not shipped; sending http/protobuf (port 4318)", protocol)
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    install(provider)
    log.info("tracing on: service.name=%s exporters=%s", resource.attributes.get(SERVICE_NAME), ",".join(names))
    return True


def install(provider: TracerProvider | None) -> None:
    """Use `provider` for this process's spans (None: tracing off). For tests and `setup`."""
    global _provider, _tracer
    _provider = provider
    _tracer = provider.get_tracer("legodiffusion") if provider is not None else None


def shutdown() -> None:
    """Send the spans still batched and stop tracing (at process exit)."""
    provider = _provider
    install(None)
    if provider is not None:
        try:
            provider.shutdown()
        except Exception as exc:  # the collector being away must not fail a clean exit
            log.warning("flushing spans failed: %s", exc)


def enabled() -> bool:
    return _tracer is not None


# -- propagation over NATS headers (W3C trace context) ------------------------------------------


def inject(headers: dict[str, str] | None = None, context: Context | None = None) -> dict[str, str]:
    """Add `traceparent` (and `tracestate`) of `context` (default: the current one) to `headers`.

    Returns `headers` (a new dict when None). Off, or with no span in the context: unchanged.
    """
    out = {} if headers is None else headers
    if _tracer is None:
        return out
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    TraceContextTextMapPropagator().inject(out, context=context)
    return out


def extract(headers: Mapping[str, str] | None) -> Context | None:
    """The trace context carried in message headers (None when off or absent)."""
    if _tracer is None or not headers or TRACEPARENT not in headers:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(headers)


# -- spans --------------------------------------------------------------------------------------


def span(
    name: str, attributes: Mapping[str, Any] | None = None, parent: Context | None = None
) -> contextlib.AbstractContextManager[Span | None]:
    """A span current for the `with` block, child of `parent` (default: the current span).

    Yields the span, or None when tracing is off. An exception leaving the block is recorded on it.
    """
    if _tracer is None:
        return _NULL
    return _tracer.start_as_current_span(name, context=parent, attributes=attributes)


@contextlib.contextmanager
def _transfer(direction: str, transport: str, nbytes: int, peer: str) -> Iterator[None]:
    import time

    assert _tracer is not None
    attributes: dict[str, Any] = {"tensor.transport": transport, "tensor.bytes": nbytes, "tensor.peer": peer}
    with _tracer.start_as_current_span(f"tensor.{direction}", attributes=attributes) as sp:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sp.set_attribute("tensor.seconds", time.perf_counter() - t0)


def transfer(direction: str, transport: str, nbytes: int, peer: str = "") -> contextlib.AbstractContextManager[None]:
    """A `tensor.<direction>` span (e.g. tensor.pull) with transport, bytes and seconds attributes."""
    if _tracer is None:
        return _NULL
    return _transfer(direction, transport, nbytes, peer)


def record(
    name: str, start_s: float, end_s: float, attributes: Mapping[str, Any] | None = None, parent: Context | None = None
) -> None:
    """A span that already happened, from unix times `start_s` to `end_s` (e.g. a queue wait)."""
    if _tracer is None:
        return
    sp = _tracer.start_span(name, context=parent, attributes=attributes, start_time=int(start_s * 1e9))
    sp.end(end_time=int(max(start_s, end_s) * 1e9))


def event(name: str, attributes: Mapping[str, Any] | None = None) -> None:
    """An event on the current span (no-op without one)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().add_event(name, attributes=attributes)


def annotate(sp: Span | None, attributes: Mapping[str, Any], error: str | None = None) -> None:
    """Set attributes on `sp` (None: nothing), and mark it failed with `error` when given."""
    if sp is None:
        return
    sp.set_attributes(attributes)
    if error is not None:
        from opentelemetry.trace import Status, StatusCode

        sp.set_status(Status(StatusCode.ERROR, error))


class Scope:
    """A span made current until `close()`: for code whose span cannot be one `with` block
    (the gateway's request, whose steps are published from result callbacks: `headers` carries
    its context to them). Open and close it in the same task."""

    def __init__(self, sp: Span | None = None, token: object = None) -> None:
        self.span = sp
        self._token = token
        self.headers: dict[str, str] = {}
        # Kept after close: work done for the request after its span ended (the gateway's PNG
        # encoding) still belongs under it.
        self.context: Context | None = None
        if sp is not None:
            from opentelemetry import trace

            self.context = trace.set_span_in_context(sp)
            inject(self.headers, self.context)

    def close(self, attributes: Mapping[str, Any] | None = None, error: str | None = None) -> None:
        if self.span is None:
            return
        from opentelemetry import context

        annotate(self.span, attributes or {}, error)
        self.span.end()
        if self._token is not None:
            context.detach(self._token)  # type: ignore[arg-type]
        self.span = self._token = None


def begin(name: str, attributes: Mapping[str, Any] | None = None) -> Scope:
    """Start a span, make it current in this task, and return its `Scope` (empty when off)."""
    if _tracer is None:
        return Scope()
    from opentelemetry import context, trace

    sp = _tracer.start_span(name, attributes=attributes, kind=trace.SpanKind.SERVER)
    return Scope(sp, context.attach(trace.set_span_in_context(sp)))


# -- crossing threads ---------------------------------------------------------------------------


def carry(fn: Callable[[], T]) -> Callable[[], T]:
    """`fn` bound to the caller's context, to run on another thread (run_in_executor does not
    copy context): spans it opens nest under the caller's span. Off: `fn` itself."""
    if _tracer is None:
        return fn
    return functools.partial(contextvars.copy_context().run, fn)


def bind(coro: Coroutine[Any, Any, T]) -> Coroutine[Any, Any, T]:
    """`coro` run under the calling thread's trace context, for `run_coroutine_threadsafe` from a
    compute thread (the loop would otherwise run it in its own context). Off: `coro` itself."""
    if _tracer is None:
        return coro
    from opentelemetry import context

    return _within(context.get_current(), coro)


async def _within(ctx: Context, coro: Coroutine[Any, Any, T]) -> T:
    from opentelemetry import context

    token = context.attach(ctx)
    try:
        return await coro
    finally:
        context.detach(token)
