"""Prometheus metrics: one registry per process, served at `/metrics` (the gateway on its own
HTTP port, each model service on `LEGO_METRICS_PORT`, announced in the presence bucket).

Counted where things happen (requests at the gateway, steps in the worker loop); read at scrape
time where a counter exists already (the tensor plane's transfer stats, the runners' status,
the GPUs through NVML), so the hot paths pay nothing extra for those. Every name starts `lego_`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from shared import subjects

log = logging.getLogger("lego.metrics")

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
PlatformCollector(registry=REGISTRY)

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# -- gateway ------------------------------------------------------------------------------------
REQUESTS = Counter(
    "lego_requests", "Requests finished, by workflow and final status", ["workflow", "status"], registry=REGISTRY
)
REQUEST_SECONDS = Histogram(
    "lego_request_seconds",
    "Wall time of a request at the gateway, from planning to its images",
    ["workflow", "status"],
    buckets=_SECONDS,
    registry=REGISTRY,
)
REQUESTS_IN_FLIGHT = Gauge("lego_requests_in_flight", "Requests running now", ["workflow"], registry=REGISTRY)
PRIORITY_REQUESTS = Counter(
    "lego_priority_requests",
    "Requests finished or refused, by priority band (high: priority >= 5; normal) and final status",
    ["band", "status"],
    registry=REGISTRY,
)


def _band_label(priority: int) -> str:
    return subjects.band_of(priority) or "normal"


def request_started(workflow: str) -> None:
    REQUESTS_IN_FLIGHT.labels(workflow).inc()


def request_refused(workflow: str, status: str, priority: int = 0) -> None:
    """Count a request refused before it ran (`status`: overloaded)."""
    REQUESTS.labels(workflow, status).inc()
    PRIORITY_REQUESTS.labels(_band_label(priority), status).inc()


def request_finished(workflow: str, status: str, seconds: float, priority: int = 0) -> None:
    """Count a request that ended (`status`: succeeded, failed, cancelled) and its wall time."""
    REQUESTS_IN_FLIGHT.labels(workflow).dec()
    REQUESTS.labels(workflow, status).inc()
    REQUEST_SECONDS.labels(workflow, status).observe(seconds)
    PRIORITY_REQUESTS.labels(_band_label(priority), status).inc()


# Usage per API key, labelled by the key's NAME (never the key): what each tenant used.
KEY_REQUESTS = Counter(
    "lego_key_requests", "Requests finished, by API key name and final status", ["key", "status"], registry=REGISTRY
)
KEY_IMAGES = Counter("lego_key_images", "Images answered, by API key name", ["key"], registry=REGISTRY)
KEY_GPU_SECONDS = Counter(
    "lego_key_gpu_seconds",
    "Compute seconds of a key's requests' steps in the models (GPU seconds on a GPU mesh), by API key name",
    ["key"],
    registry=REGISTRY,
)


def key_request_finished(name: str, status: str, compute_s: float) -> None:
    """Count a request of the key named `name` that ended, and the model compute it used."""
    KEY_REQUESTS.labels(name, status).inc()
    KEY_GPU_SECONDS.labels(name).inc(max(0.0, compute_s))


def key_images(name: str, images: int) -> None:
    KEY_IMAGES.labels(name).inc(images)


# -- model services -----------------------------------------------------------------------------
STEPS = Counter(
    "lego_steps", "Steps answered by this replica, by outcome", ["kind", "model", "outcome"], registry=REGISTRY
)
STEP_SECONDS = Histogram(
    "lego_step_seconds",
    "Time from taking a step off the queue to settling it (inputs, compute, outputs, result)",
    ["kind", "model", "outcome"],
    buckets=_SECONDS,
    registry=REGISTRY,
)
QUEUE_WAIT_SECONDS = Histogram(
    "lego_queue_wait_seconds",
    "Time a step waited in JetStream, from its publication to this replica taking it",
    ["kind", "model"],
    buckets=(0.001, *_SECONDS),
    registry=REGISTRY,
)
STEPS_IN_FLIGHT = Gauge(
    "lego_steps_in_flight", "Steps this replica is running now", ["kind", "model"], registry=REGISTRY
)
BATCH_SIZE = Histogram(
    "lego_batch_size",
    "Steps run in one model call (each step runs alone today)",
    ["kind", "model"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
    registry=REGISTRY,
)
DENOISE_DEGREE = Counter(
    "lego_denoise_requests_by_degree",
    "Denoising requests a parallel group ran, by the degree it chose (devices one request was split over)",
    ["model", "degree"],
    registry=REGISTRY,
)
GROUP_DEVICES = Gauge(
    "lego_group_devices",
    "Devices this denoiser replica's parallel group owns (1: no group)",
    ["model"],
    registry=REGISTRY,
)
BACKLOG = Gauge(
    "lego_backlog_steps",
    "Steps of a model's consumer: pending (not yet delivered) and ack_pending (delivered, unanswered)",
    ["kind", "model", "state"],
    registry=REGISTRY,
)

BACKLOG_INTERVAL_S = 2.0
OUTCOMES = ("ok", "bad_step_input", "input_lost", "cancelled", "deadline_exceeded", "retry", "step_failed")


class StepMetrics:
    """The step metrics of one (kind, model), label children bound once (the worker's hot path)."""

    def __init__(self, kind: str, model: str) -> None:
        self.kind, self.model = kind, model
        self.queue_wait = QUEUE_WAIT_SECONDS.labels(kind, model)
        self.in_flight = STEPS_IN_FLIGHT.labels(kind, model)
        self.batch = BATCH_SIZE.labels(kind, model)
        self._done: dict[str, tuple[Any, Any]] = {}

    def finished(self, outcome: str, seconds: float) -> None:
        pair = self._done.get(outcome)
        if pair is None:
            pair = self._done[outcome] = (
                STEPS.labels(self.kind, self.model, outcome),
                STEP_SECONDS.labels(self.kind, self.model, outcome),
            )
        pair[0].inc()
        pair[1].observe(seconds)


# -- read at scrape time ------------------------------------------------------------------------


class _Plane(Protocol):
    @property
    def stats(self) -> dict[str, Any]: ...


class _Runner(Protocol):
    model_id: str
    kinds: tuple[Any, ...]

    def status(self) -> dict[str, Any]: ...


class GpuProbe:
    """NVML, where there is a GPU driver: memory and utilisation per device. Without one
    (`nvmlInit` raises, or pynvml is missing) `count` is 0 and nothing else is reported."""

    def __init__(self) -> None:
        self.count = 0
        self.reason = ""
        try:
            import pynvml

            pynvml.nvmlInit()
            self.count = pynvml.nvmlDeviceGetCount()
            self._nvml: Any = pynvml
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
            self.reason = f"no GPU: {type(exc).__name__}: {exc}"
            log.debug("%s", self.reason)

    def sample(self) -> list[dict[str, Any]]:
        out = []
        for i in range(self.count):
            try:
                handle = self._nvml.nvmlDeviceGetHandleByIndex(i)
                mem = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                util = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                name = self._nvml.nvmlDeviceGetName(handle)
            except Exception as exc:  # a device gone or busy: skip it this scrape
                log.debug("nvml: device %d: %s", i, exc)
                continue
            out.append(
                {
                    "gpu": str(i),
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "used": int(mem.used),
                    "total": int(mem.total),
                    "util": util.gpu / 100.0,
                }
            )
        return out


class _Sources:
    """The collector of everything read at scrape time; one, registered at import."""

    def __init__(self) -> None:
        self.planes: weakref.WeakSet[Any] = weakref.WeakSet()
        self.runners: list[_Runner] = []
        self.device = ""
        self.gpus: GpuProbe | None = None
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        yield from self._plane_metrics()
        yield from self._model_metrics()
        if self.gpus is not None:
            yield from self._gpu_metrics(self.gpus)

    def _plane_metrics(self) -> Iterator[Metric]:
        transfers = CounterMetricFamily(
            "lego_tensor_transfers",
            "Tensor plane events by direction (put, served, fetched, refused, fallback) and transport",
            labels=["direction", "transport"],
        )
        moved = CounterMetricFamily(
            "lego_tensor_bytes", "Tensor bytes by direction and transport", labels=["direction", "transport"]
        )
        held = GaugeMetricFamily("lego_tensors_held", "Tensors this process holds for consumers now")
        held_bytes = GaugeMetricFamily("lego_tensors_held_bytes", "Bytes of the tensors this process holds now")
        counts: dict[tuple[str, str], list[int]] = {}
        stored = [0, 0]
        with self._lock:
            planes = list(self.planes)
        for plane in planes:
            try:
                stats = plane.stats
                stats = dict(stats() if callable(stats) else stats)
            except Exception:  # a plane closing under us: skip it this scrape
                continue
            held_now = stats.pop("stored", {})
            stored[0] += int(held_now.get("count", 0))
            stored[1] += int(held_now.get("bytes", 0))
            for section, by_transport in stats.items():
                for transport, slot in by_transport.items():
                    c = counts.setdefault((section, transport), [0, 0])
                    c[0] += slot.get("count", 0)
                    c[1] += slot.get("bytes", 0)
        for (section, transport), (n, b) in sorted(counts.items()):
            transfers.add_metric([section, transport], n)
            moved.add_metric([section, transport], b)
        held.add_metric([], stored[0])
        held_bytes.add_metric([], stored[1])
        yield from (transfers, moved, held, held_bytes)

    def _model_metrics(self) -> Iterator[Metric]:
        with self._lock:
            runners = list(self.runners)
        if not runners:
            return
        loaded = GaugeMetricFamily(
            "lego_model_loaded",
            "Models loaded in this process (1 per step kind served)",
            labels=["model", "kind", "device"],
        )
        params = GaugeMetricFamily(
            "lego_model_param_bytes", "Bytes of a loaded model's parameters and buffers", labels=["model", "device"]
        )
        loras = GaugeMetricFamily("lego_model_loras", "LoRA adapters loaded into a base model", labels=["model"])
        for runner in runners:
            try:
                status = runner.status()
            except Exception as exc:
                log.debug("status of %s: %s", runner.model_id, exc)
                status = {}
            for kind in runner.kinds:
                loaded.add_metric([runner.model_id, str(kind), self.device], 1)
            params.add_metric([runner.model_id, self.device], int(status.get("param_bytes", 0)))
            if "loras" in status:
                loras.add_metric([runner.model_id], len(status["loras"]))
        yield from (loaded, params, loras)

    @staticmethod
    def _gpu_metrics(probe: GpuProbe) -> Iterator[Metric]:
        count = GaugeMetricFamily("lego_gpus", "GPUs NVML sees (0 where there is no GPU driver)")
        count.add_metric([], probe.count)
        yield count
        if not probe.count:
            return
        used = GaugeMetricFamily("lego_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu", "name"])
        total = GaugeMetricFamily("lego_gpu_memory_total_bytes", "GPU memory", labels=["gpu", "name"])
        util = GaugeMetricFamily(
            "lego_gpu_utilization_ratio", "GPU busy fraction (NVML, last sample period)", labels=["gpu", "name"]
        )
        for s in probe.sample():
            used.add_metric([s["gpu"], s["name"]], s["used"])
            total.add_metric([s["gpu"], s["name"]], s["total"])
            util.add_metric([s["gpu"], s["name"]], s["util"])
        yield from (used, total, util)


SOURCES = _Sources()
REGISTRY.register(SOURCES)


def watch_plane(plane: _Plane) -> None:
    """Report this tensor plane's transfer counters (read at scrape time; held weakly)."""
    with SOURCES._lock:
        SOURCES.planes.add(plane)


def watch_models(runners: Iterable[_Runner], device: str) -> None:
    """Report these loaded models and their parameter bytes; and the GPUs, where there are any."""
    with SOURCES._lock:
        SOURCES.runners = list(runners)
        SOURCES.device = device
    if SOURCES.gpus is None:
        SOURCES.gpus = GpuProbe()
        if not SOURCES.gpus.count:
            log.info("GPU metrics off (%s)", SOURCES.gpus.reason)


def render(accept: str | None = None) -> tuple[bytes, str]:
    """This process's metrics as (body, content type), in the format `accept` asks for."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(REGISTRY), content_type


async def sample_backlog(
    backlog: Callable[[str, str], Awaitable[tuple[int, int] | None]],
    consumers: Iterable[tuple[str, str]],
    stop: asyncio.Event,
    interval_s: float = BACKLOG_INTERVAL_S,
) -> None:
    """Every `interval_s` until `stop`, set `lego_backlog_steps` of each (kind, model) consumer
    from `backlog(kind, model)` (e.g. `Bus.consumer_backlog`)."""
    consumers = list(consumers)
    while not stop.is_set():
        for kind, model in consumers:
            try:
                counts = await backlog(kind, model)
            except Exception as exc:  # NATS away for a moment: keep the last value
                log.debug("backlog of %s/%s: %s", kind, model, exc)
                continue
            if counts is not None:
                BACKLOG.labels(kind, model, "pending").set(counts[0])
                BACKLOG.labels(kind, model, "ack_pending").set(counts[1])
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except TimeoutError:
            pass


# -- the services' HTTP endpoint ----------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server_version = "lego-metrics"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, content_type = render(self.headers.get("Accept"))
            status = 200
        elif path == "/healthz":
            body, content_type, status = b'{"status": "ok"}', "application/json", 200
        else:
            body, content_type, status = b"not found: try /metrics or /healthz\n", "text/plain", 404
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds: not worth a line
        pass


class MetricsServer:
    """`/metrics` and `/healthz` over HTTP on a thread; `start()` binds (port 0: any free one)."""

    def __init__(self) -> None:
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self, bind: str, port: int = 0) -> int:
        """Serve on `bind`:`port`; a taken port (several replicas on one host) falls back to a free one."""
        try:
            server = ThreadingHTTPServer((bind, port), _Handler)
        except OSError as exc:
            if not port:
                raise
            log.warning("metrics port %d unavailable (%s); serving on a free port", port, exc)
            server = ThreadingHTTPServer((bind, 0), _Handler)
        server.daemon_threads = True
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="metrics-http", daemon=True
        )
        self._thread.start()
        return self.port

    def url(self, host: str) -> str:
        return f"http://{host}:{self.port}/metrics" if self._server is not None else ""

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None
