"""Every NATS subject, stream and consumer name is built here and nowhere else."""

from __future__ import annotations

import re

from shared.messages import StepKind

STEP_STREAM = "LEGO_STEPS"
STEP_SUBJECTS = "lego.step.>"
RESULT_STREAM = "LEGO_RESULTS"
RESULT_SUBJECTS = "lego.result.>"
PROGRESS_SUBJECTS = "lego.progress.>"
RELEASE_SUBJECT = "lego.release"
CANCEL_SUBJECT = "lego.cancel"  # core NATS: a request was cancelled; payload = its run id
LORA_PREFETCH_SUBJECTS = "lego.lora.prefetch.>"
# core NATS: a gateway admitted a request; payload = the (kind, model) of each step it will publish
# (the autoscaler scales a model for them before they reach it: services/autoscaler/policy.py)
ADMITTED_SUBJECT = "lego.admitted"

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def _check_token(value: str, what: str) -> str:
    if not _TOKEN.match(value):
        raise ValueError(f"{what} {value!r} may hold only letters, digits, '-' and '_' (it is a subject token)")
    return value


# Priority bands of a model's steps, highest first: (band, the lowest request priority in it).
# A step of priority >= 5 goes to `lego.step.<kind>.<model>.high`, with a durable consumer of its
# own (`<kind>__<model>__high`: a WorkQueue stream needs consumers whose filters do not overlap);
# the rest keep the band-less subject and consumer that existing streams, deployments and KEDA
# triggers already name. Replicas pull the bands in this order (shared/priority_pull.py).
NORMAL_BAND = ""
PRIORITY_BANDS: tuple[tuple[str, int], ...] = (("high", 5), (NORMAL_BAND, 0))
BAND_NAMES: tuple[str, ...] = tuple(name for name, _ in PRIORITY_BANDS)


def band_of(priority: int) -> str:
    """The band a step of `priority` (0-9) queues in."""
    for name, floor in PRIORITY_BANDS:
        if priority >= floor:
            return name
    return NORMAL_BAND


def band_rank(priority: int) -> int:
    """0 for the highest band; the band of `priority` is served before every band of a larger rank."""
    return BAND_NAMES.index(band_of(priority))


def bands_at_or_above(priority: int) -> tuple[str, ...]:
    """The bands whose steps a step of `priority` waits behind: its own and the higher ones."""
    return BAND_NAMES[: band_rank(priority) + 1]


def _check_band(band: str) -> str:
    if band not in BAND_NAMES:
        raise ValueError(f"unknown priority band {band!r}; known: {BAND_NAMES}")
    return band


def step_subject(kind: StepKind | str, model_id: str, band: str = NORMAL_BAND) -> str:
    """`lego.step.<kind>.<model_id>[.<band>]`: one subject per (kind, model, band), shared by all its replicas."""
    base = f"lego.step.{_check_token(str(kind), 'kind')}.{_check_token(model_id, 'model id')}"
    return f"{base}.{band}" if _check_band(band) else base


def consumer_name(kind: StepKind | str, model_id: str, band: str = NORMAL_BAND) -> str:
    """The durable pull consumer of one band that every replica of a model shares (competing consumers)."""
    base = f"{_check_token(str(kind), 'kind')}__{_check_token(model_id, 'model id')}"
    for other in BAND_NAMES:
        if other and base.endswith(f"__{other}"):
            raise ValueError(f"model id {model_id!r} may not end in '__{other}': that names a priority band")
    return f"{base}__{band}" if _check_band(band) else base


def parse_consumer_name(name: str) -> tuple[str, str, str] | None:
    """(kind, model id, band) of a step consumer's name; None for a name `consumer_name` never builds."""
    kind, sep, rest = name.partition("__")
    if not sep or not kind or not rest:
        return None
    for band in BAND_NAMES:
        if band and rest.endswith(f"__{band}"):
            return kind, rest[: -len(band) - 2], band
    return kind, rest, NORMAL_BAND


def step_subjects_of_kind(kind: StepKind | str) -> str:
    """`lego.step.<kind>.>`: every model's steps of one kind, in every band (a permission's pattern)."""
    return f"lego.step.{_check_token(str(kind), 'kind')}.>"


def lora_prefetch_subject(model_id: str) -> str:
    """`lego.lora.prefetch.<model_id>`: core NATS, a planned request's LoRAs, for that base's denoisers to read."""
    return f"lego.lora.prefetch.{_check_token(model_id, 'model id')}"


def result_subject(gateway_id: str) -> str:
    return f"lego.result.{_check_token(gateway_id, 'gateway id')}"


def progress_subject(gateway_id: str) -> str:
    return f"lego.progress.{_check_token(gateway_id, 'gateway id')}"


def max_deliveries_advisory() -> str:
    """JetStream's advisory when a step consumer gives up on a message after MaxDeliver."""
    return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{STEP_STREAM}.*"


def step_msg_id(request_id: str, node_id: str, attempt: int) -> str:
    """`Nats-Msg-Id` of a step publish: JetStream drops a second publish of the same attempt."""
    return f"{request_id}:{node_id}:{attempt}"


def result_msg_id(request_id: str, node_id: str, attempt: int) -> str:
    """`Nats-Msg-Id` of a result: a redelivered step cannot publish a second result, while a
    re-planned attempt (new attempt number) can."""
    return f"{request_id}:{node_id}:{attempt}:result"


# -- KV buckets (JetStream streams named KV_<bucket>) ----------------------------------------
PRESENCE_BUCKET = "lego_replicas"  # replicas' heartbeats (shared.presence)
STATUS_BUCKET = "lego_autoscaler"  # the autoscaler's latest status (shared.presence)
KEYS_BUCKET = "LEGO_KEYS"  # the gateway's API keys: no model service may read it
LORAS_BUCKET = "LEGO_LORAS"  # registered LoRAs (shared.lora_registry): the gateway's to write
# Gateways without private state (services/gateway/records.py, leases.py): every request's record,
# which gateway drives each running request, the gateways alive (TTL), and Idempotency-Keys.
REQUESTS_BUCKET = "LEGO_REQUESTS"
LEASES_BUCKET = "LEGO_LEASES"
GATEWAYS_BUCKET = "lego_gateways"
IDEMPOTENCY_BUCKET = "LEGO_IDEMPOTENCY"
# A request's events (what `/events` streams), so any gateway can stream any request's.
EVENT_STREAM = "LEGO_EVENTS"
EVENT_SUBJECTS = "lego.events.>"


def event_subject(run_id: str) -> str:
    """`lego.events.<run id>`: one run's events, in order, in the event stream."""
    return f"lego.events.{_check_token(run_id, 'run id')}"


def kv_stream(bucket: str) -> str:
    """The stream that holds a KV bucket."""
    return f"KV_{bucket}"


def kv_subject(bucket: str, key: str = ">") -> str:
    """`$KV.<bucket>.<key>`: what a put or delete of `key` publishes (`>`: every key)."""
    return f"$KV.{bucket}.{key}"


# -- JetStream API subjects (what a client publishes to manage and read streams). They name
# what each bus role may do (shared.bus_roles): a permission is a subject pattern. ----------
JS_API = "$JS.API"


def js_stream_api(action: str, stream: str = "*") -> str:
    """`$JS.API.STREAM.<action>.<stream>` (action: CREATE, UPDATE, INFO, DELETE, PURGE, MSG.GET ...)."""
    return f"{JS_API}.STREAM.{action}.{stream}"


def js_consumer_create(stream: str, consumer: str = "", filter_subject: str = "") -> str:
    """Creating a consumer: `...CREATE.<stream>` (ephemeral), `.<name>`, `.<name>.<filter>`.
    The filtered form lets a permission name which subjects the consumer may read."""
    return ".".join(p for p in (f"{JS_API}.CONSUMER.CREATE.{stream}", consumer, filter_subject) if p)


def js_consumer_api(action: str, stream: str, consumer: str = "*") -> str:
    """`$JS.API.CONSUMER.<action>.<stream>.<consumer>` (action: INFO, DELETE, MSG.NEXT)."""
    return f"{JS_API}.CONSUMER.{action}.{stream}.{consumer}"


def js_consumer_list(stream: str) -> list[str]:
    """Listing a stream's consumers (names or infos)."""
    return [f"{JS_API}.CONSUMER.LIST.{stream}", f"{JS_API}.CONSUMER.NAMES.{stream}"]


def js_direct_get(stream: str) -> list[str]:
    """Reading one message of a stream (a KV get), both the direct and the API form."""
    return [f"{JS_API}.DIRECT.GET.{stream}", f"{JS_API}.DIRECT.GET.{stream}.>", js_stream_api("MSG.GET", stream)]


def js_ack(stream: str, consumer: str) -> str:
    """Acks (ack, nak, in-progress, term) of a consumer's messages."""
    return f"$JS.ACK.{stream}.{consumer}.>"


JS_FLOW_CONTROL = "$JS.FC.>"  # an ordered push consumer answers the server's flow control here
JS_STREAM_NAMES = f"{JS_API}.STREAM.NAMES"  # finding a stream by subject (js.subscribe does)
JS_STREAM_LIST = f"{JS_API}.STREAM.LIST"
JS_ACCOUNT_INFO = f"{JS_API}.INFO"
INBOX = "_INBOX.>"  # replies: JetStream API answers, publish acks, push consumers' deliveries
