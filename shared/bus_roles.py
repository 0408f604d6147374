"""Who may do what on the bus: one NATS user per role, each with the subjects it may use.

Why: on an open bus any process (or anyone who reaches NATS) could publish a denoise step,
delete the step stream or read the API keys. Each process connects as its role and the
server refuses every subject outside the role's lists. The lists are built from
`shared.subjects` (the one place for names) and the model registry (which consumers each
service owns), so a renamed subject or a new model changes the permissions with it.

Inventory (what each party really does on the bus, in nats-py terms):
- every client: JetStream API answers and publish acks arrive on `_INBOX.>`.
- model services (encoder, denoiser, adapters, vae): create, read (`CONSUMER.INFO`) and pull
  from (`CONSUMER.MSG.NEXT`) their own kinds' step consumers, ack them (`$JS.ACK`), and hear
  steps published on their higher priority bands (core NATS; shared/priority_pull.py); publish
  results, progress and release notices; hear cancel and release notices; heartbeat in the
  presence bucket under their own kinds' keys; wait for the streams (`STREAM.INFO`); and take
  results back of the steps they call (an ordered push consumer on the result stream: the
  denoiser's ControlNet calls). The denoiser alone also publishes ControlNet steps.
- gateway: publishes every kind of step, cancel, release and admission notices; reads its results
  (ordered consumer), progress and the max-deliveries advisories; creates the streams and
  buckets; reads consumers, presence and the autoscaler status; owns the API keys bucket.
- autoscaler: lists the step consumers, reads presence, writes its status bucket, hears the
  gateways' admission notices.
- admin (`lego up` itself, operators): no limits.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared import subjects
from shared.messages import StepKind

ADMIN = "admin"
GATEWAY = "gateway"
AUTOSCALER = "autoscaler"
# A model service's role is its service name; the kinds of step its replicas consume.
SERVICE_KINDS: dict[str, tuple[str, ...]] = {
    "encoder": (StepKind.ENCODE,),
    "denoiser": (StepKind.DENOISE,),
    "adapters": (StepKind.CONTROLNET,),
    "vae": (StepKind.VAE_DECODE, StepKind.VAE_ENCODE),
}
# Kinds of step a service publishes itself (a denoising step calls the ControlNet mid-loop).
SERVICE_CALLS: dict[str, tuple[str, ...]] = {"denoiser": (StepKind.CONTROLNET,)}
ROLES: tuple[str, ...] = (ADMIN, GATEWAY, AUTOSCALER, *SERVICE_KINDS)
# Roles that create the streams and buckets; the others wait until these exist.
CREATORS = frozenset({ADMIN, GATEWAY})


@dataclass(frozen=True)
class Permissions:
    """Subject patterns a role may publish to and subscribe to; None: no limit (admin)."""

    publish: tuple[str, ...] | None
    subscribe: tuple[str, ...] | None


def may_create_streams(user: str) -> bool:
    """Whether a process connecting as `user` creates streams and buckets (else it waits for
    them). An empty user is an unlocked bus: everyone creates, as before the lock."""
    return not user or user in CREATORS or user not in ROLES


def permissions(role: str) -> Permissions:
    """The permissions of one role; ValueError names the roles for an unknown one."""
    if role == ADMIN:
        return Permissions(None, None)
    if role == GATEWAY:
        return _gateway()
    if role == AUTOSCALER:
        return _autoscaler()
    if role in SERVICE_KINDS:
        return _service(role)
    raise ValueError(f"unknown bus role {role!r}; roles: {', '.join(ROLES)}")


def _unique(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _read_kv(bucket: str) -> list[str]:
    stream = subjects.kv_stream(bucket)
    return [subjects.js_stream_api("INFO", stream), *subjects.js_direct_get(stream)]


def _results_consumer() -> list[str]:
    """An ordered push consumer on the result stream (what `Bus.subscribe_results` makes)."""
    stream = subjects.RESULT_STREAM
    return [
        subjects.JS_STREAM_NAMES,
        subjects.js_consumer_create(stream),
        subjects.js_consumer_create(stream, "*"),
        subjects.js_consumer_create(stream, "*", ">"),
        subjects.js_consumer_api("DELETE", stream),
        subjects.js_consumer_api("INFO", stream),
        subjects.JS_FLOW_CONTROL,
    ]


def _wait_streams() -> list[str]:
    return [subjects.js_stream_api("INFO", s) for s in (subjects.STEP_STREAM, subjects.RESULT_STREAM)]


def step_consumers(service: str) -> list[tuple[str, str]]:
    """Every (kind, model id) step consumer a service's replicas may own: its kinds x its models."""
    from shared.zoo.registry import models_of_service

    return [(kind, model) for kind in SERVICE_KINDS[service] for model in models_of_service(service)]


def _service(service: str) -> Permissions:
    stream = subjects.STEP_STREAM
    publish = [
        subjects.RESULT_SUBJECTS,
        subjects.PROGRESS_SUBJECTS,
        subjects.RELEASE_SUBJECT,
        *_wait_streams(),
        *_read_kv(subjects.PRESENCE_BUCKET),
        *(subjects.kv_subject(subjects.PRESENCE_BUCKET, f"{kind}.>") for kind in SERVICE_KINDS[service]),
        *_results_consumer(),
        *(subjects.step_subjects_of_kind(kind) for kind in SERVICE_CALLS.get(service, ())),
    ]
    for kind, model in step_consumers(service):
        for band in subjects.BAND_NAMES:
            name = subjects.consumer_name(kind, model, band)
            publish += [
                subjects.js_consumer_create(stream, name, subjects.step_subject(kind, model, band)),
                subjects.js_consumer_api("INFO", stream, name),
                subjects.js_consumer_api("MSG.NEXT", stream, name),
                subjects.js_ack(stream, name),
            ]
    subscribe = [subjects.INBOX, subjects.CANCEL_SUBJECT, subjects.RELEASE_SUBJECT]
    for kind, model in step_consumers(service):  # higher bands heard while trusted empty (priority_pull)
        subscribe += [subjects.step_subject(kind, model, band) for band in subjects.BAND_NAMES[:-1]]
    if StepKind.DENOISE in SERVICE_KINDS[service]:
        subscribe.append(subjects.LORA_PREFETCH_SUBJECTS)  # LoRAs of planned requests, to read early
        publish += _watch_kv(subjects.LORAS_BUCKET)  # deleted LoRAs, to free their memory
    return Permissions(_unique(publish), _unique(subscribe))


def _watch_kv(bucket: str) -> list[str]:
    """Read and watch a KV bucket (an ordered push consumer on its stream)."""
    stream = subjects.kv_stream(bucket)
    return [
        *_read_kv(bucket),
        subjects.js_consumer_create(stream),
        subjects.js_consumer_create(stream, "*"),
        subjects.js_consumer_create(stream, "*", ">"),
        subjects.js_consumer_api("INFO", stream),
        subjects.js_consumer_api("DELETE", stream),
        subjects.JS_FLOW_CONTROL,
    ]


def _owned_bucket(bucket: str) -> list[str]:
    """Read, write, list and watch a KV bucket (the gateway's own: API keys, LoRAs)."""
    stream = subjects.kv_stream(bucket)
    return [
        *_read_kv(bucket),
        subjects.kv_subject(bucket),
        subjects.js_consumer_create(stream),
        subjects.js_consumer_create(stream, "*"),
        subjects.js_consumer_create(stream, "*", ">"),
        subjects.js_consumer_api("INFO", stream),
        subjects.js_consumer_api("DELETE", stream),
        subjects.js_consumer_api("MSG.NEXT", stream),
        subjects.js_ack(stream, "*"),
    ]


def _gateway() -> Permissions:
    managed = [subjects.STEP_STREAM, subjects.RESULT_STREAM]
    managed += [subjects.kv_stream(b) for b in (subjects.PRESENCE_BUCKET, subjects.STATUS_BUCKET)]
    keys = subjects.kv_stream(subjects.KEYS_BUCKET)
    loras = subjects.kv_stream(subjects.LORAS_BUCKET)
    # Gateways without private state: the request records, leases, heartbeats, Idempotency-Keys
    # and the event stream are the gateways' own (services/gateway/records.py, leases.py).
    shared_state = (
        subjects.REQUESTS_BUCKET,
        subjects.LEASES_BUCKET,
        subjects.GATEWAYS_BUCKET,
        subjects.IDEMPOTENCY_BUCKET,
    )
    managed += [subjects.kv_stream(b) for b in shared_state] + [subjects.EVENT_STREAM]
    events = subjects.EVENT_STREAM
    publish = [
        subjects.STEP_SUBJECTS,
        subjects.EVENT_SUBJECTS,
        *(p for b in shared_state for p in _owned_bucket(b)),
        subjects.js_consumer_create(events),
        subjects.js_consumer_create(events, "*"),
        subjects.js_consumer_create(events, "*", ">"),
        subjects.js_consumer_api("INFO", events),
        subjects.js_consumer_api("DELETE", events),
        subjects.JS_FLOW_CONTROL,
        subjects.LORA_PREFETCH_SUBJECTS,
        subjects.ADMITTED_SUBJECT,
        subjects.CANCEL_SUBJECT,
        subjects.RELEASE_SUBJECT,
        subjects.JS_ACCOUNT_INFO,
        subjects.js_stream_api("INFO", "*"),
        subjects.JS_STREAM_NAMES,
        subjects.JS_STREAM_LIST,
        *(subjects.js_stream_api(action, s) for s in [*managed, keys, loras] for action in ("CREATE", "UPDATE")),
        subjects.js_consumer_api("INFO", subjects.STEP_STREAM),
        *subjects.js_consumer_list(subjects.STEP_STREAM),
        *_results_consumer(),
        *_read_kv(subjects.PRESENCE_BUCKET),
        *_read_kv(subjects.STATUS_BUCKET),
        *_owned_bucket(subjects.KEYS_BUCKET),
        *_owned_bucket(subjects.LORAS_BUCKET),
    ]
    subscribe = [
        subjects.INBOX,
        subjects.PROGRESS_SUBJECTS,
        subjects.CANCEL_SUBJECT,  # a DELETE another gateway took, of a request this one drives
        subjects.max_deliveries_advisory(),
    ]
    return Permissions(_unique(publish), _unique(subscribe))


def _autoscaler() -> Permissions:
    status = subjects.STATUS_BUCKET
    publish = [
        subjects.js_stream_api("INFO", subjects.STEP_STREAM),
        subjects.js_consumer_api("INFO", subjects.STEP_STREAM),
        *subjects.js_consumer_list(subjects.STEP_STREAM),
        *_read_kv(subjects.PRESENCE_BUCKET),
        *_read_kv(status),
        subjects.kv_subject(status),
    ]
    return Permissions(_unique(publish), (subjects.INBOX, subjects.ADMITTED_SUBJECT))
