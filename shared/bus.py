"""The one JetStream bus wrapper: connection, streams, consumers, and typed publish/subscribe.

Steps go through a WorkQueue stream (file storage: a server restart loses nothing) with one
durable pull consumer per (kind, model, priority band) that every replica of the model shares
(`shared/priority_pull.py` pulls the bands, higher first). Results go
through a second stream whose `Nats-Msg-Id` dedupe makes a re-run of a node unable to deliver
a second result. Progress and tensor-release notices are best-effort core NATS messages.

On a NATS cluster (LEGO_NATS_URL lists its servers) the client fails over to a survivor, and a
publish JetStream cannot acknowledge while it elects a stream's new leader is sent again (the
same `Nats-Msg-Id`: a copy that did land is dropped) for `publish_retry_s`.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import ConnectionReconnectingError, NoRespondersError, OutboundBufferLimitError
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, NoStreamResponseError, NotFoundError, ServiceUnavailableError
from nats.js.kv import KeyValue

from shared import bus_roles, nats_handoff, subjects, tracing
from shared.messages import LoraChoice, ReleaseTensors, StepKind, StepProgress, StepRequest, StepResult
from shared.settings import Settings

log = logging.getLogger("lego.bus")

NATS_MSG_ID = "Nats-Msg-Id"
T = TypeVar("T")
STREAMS_WAIT_S = 120.0  # a service that may not create the streams waits this long for them
# What a publish meets while a server is down or a stream has no leader yet: worth sending again.
# TimeoutError covers nats' own (no ack in time: the server died holding it, or a new leader is
# not elected yet); NoRespondersError, no server of the stream answers (the leader is gone).
PUBLISH_FAULTS = (
    NoRespondersError,
    NoStreamResponseError,
    ServiceUnavailableError,
    TimeoutError,
    ConnectionReconnectingError,
    OutboundBufferLimitError,
)
JS_TIMEOUT_S = 10.0  # a JetStream API call or publish ack not answered by then failed
PUBLISH_RETRY_MAX_WAIT_S = 1.0  # the longest pause between two tries of a publish
RESULTS_HEARTBEAT_S = 1.0  # a gateway's result consumer lost with its server is remade within 2 of these


def nats_servers(url: str) -> list[str]:
    """LEGO_NATS_URL as nats.connect takes it: one server's URL, or a cluster's servers
    separated by commas (the client connects to one and fails over to the others)."""
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise ValueError("LEGO_NATS_URL is empty: give a NATS server's URL (or several, comma-separated)")
    return servers


def connect_options(settings: Settings) -> dict[str, object]:
    """nats.connect's credentials and TLS from the settings: the role's user with the password
    read from its file (never from the environment, never logged), and a TLS context that
    verifies the server with `nats_tls_ca`."""
    options: dict[str, object] = {}
    if settings.nats_user:
        if not settings.nats_password_file:
            raise ValueError(
                f"LEGO_NATS_USER={settings.nats_user} needs LEGO_NATS_PASSWORD_FILE: the file holding its password"
            )
        try:
            password = Path(settings.nats_password_file).read_text().strip()
        except OSError as exc:
            raise ValueError(
                f"cannot read the NATS password of user {settings.nats_user} from "
                f"{settings.nats_password_file}: {exc.strerror}; `lego up` writes it at first start"
            ) from exc
        options.update(user=settings.nats_user, password=password)
    if settings.nats_tls_ca:
        if not Path(settings.nats_tls_ca).is_file():
            raise ValueError(f"LEGO_NATS_TLS_CA={settings.nats_tls_ca}: no such file (the CA that signed NATS's cert)")
        options["tls"] = ssl.create_default_context(cafile=settings.nats_tls_ca)
    return options


class ConsumerCounters(NamedTuple):
    """One (kind, model)'s step counters, summed over its priority bands' consumers. Backlog =
    pending + ack_pending (as KEDA's NATS JetStream scaler counts it); pending + delivered only
    grows: arrivals (redeliveries included) are its rate of change. `bands`: (band, backlog)
    of each band's consumer."""

    kind: str
    model_id: str
    pending: int
    ack_pending: int
    delivered: int
    bands: tuple[tuple[str, int], ...] = ()

    @property
    def backlog(self) -> int:
        return self.pending + self.ack_pending

    def plus(self, other: ConsumerCounters, band: str) -> ConsumerCounters:
        """These counters with `other` (one band's consumer) added."""
        return self._replace(
            pending=self.pending + other.pending,
            ack_pending=self.ack_pending + other.ack_pending,
            delivered=self.delivered + other.delivered,
            bands=(*self.bands, (band, other.backlog)),
        )


class Bus:
    """Owns one NATS connection. Connect once, reconnect forever, drain on close."""

    def __init__(self, settings: Settings, name: str) -> None:
        self.settings = settings
        self.name = name
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._closing = False  # close() was called: a disconnect now is ours, not a fault
        self._fast_requests = False  # nats_handoff took over the request mux (connect)

    @property
    def nc(self) -> NATS:
        if self._nc is None:
            raise RuntimeError("Bus.connect() was not called")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("Bus.connect() was not called")
        return self._js

    async def connect(self, timeout_s: float = 30.0) -> None:
        """Connect, retrying until `timeout_s`: services may start before nats-server is up."""
        self._closing = False
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout_s
        options = connect_options(self.settings)
        while True:
            try:
                self._nc = await self._connect_once(options, max(1.0, give_up - loop.time()))
                break
            except PermissionError:  # refused credentials: retrying cannot help
                raise
            except (OSError, nats.errors.NoServersError, TimeoutError) as exc:
                if loop.time() > give_up:
                    raise ConnectionError(
                        f"cannot reach NATS at {self.settings.nats_url}: {exc}. "
                        "Start nats-server with JetStream (-js) or point LEGO_NATS_URL / --nats-url at one."
                    ) from exc
                await asyncio.sleep(0.2)
        self._js = self._nc.jetstream(timeout=JS_TIMEOUT_S)
        self._fast_requests = await nats_handoff.speed_up_requests(self._nc)
        if not self._fast_requests:
            log.debug("nats.py's request mux is not the one nats_handoff knows: requests take its own path")

    async def _connect_once(self, options: dict[str, object], timeout_s: float) -> NATS:
        """One connect; PermissionError at once when the server refuses our credentials, and
        TimeoutError after `timeout_s` (e.g. a certificate we do not trust): the client would
        otherwise retry either forever."""
        refused = asyncio.Event()

        async def on_error(exc: Exception) -> None:
            if "authorization violation" in str(exc).lower():
                refused.set()
            await self._on_error(exc)

        connecting = asyncio.ensure_future(
            nats.connect(
                nats_servers(self.settings.nats_url),
                **options,  # type: ignore[arg-type]
                name=self.name,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=2,
                drain_timeout=5,  # shutdown must not hang on a subscription stuck mid-fetch
                allow_reconnect=True,
                error_cb=on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
            )
        )
        refusal = asyncio.ensure_future(refused.wait())
        await asyncio.wait([connecting, refusal], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        refusal.cancel()
        if connecting.done():
            return connecting.result()
        connecting.cancel()
        if not refused.is_set():
            raise TimeoutError(f"no NATS connection within {timeout_s:.0f}s (see the warnings above for why)")
        raise PermissionError(
            f"NATS at {self.settings.nats_url} refused user {self.settings.nats_user or '(none)'}: "
            "check LEGO_NATS_USER and LEGO_NATS_PASSWORD_FILE (lego up sets both for its children)"
        )

    async def _on_error(self, exc: Exception) -> None:
        log.warning("nats: %s: %s", type(exc).__name__, exc)

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("nats: disconnected from %s; reconnecting", self.settings.nats_url)

    async def _on_reconnected(self) -> None:
        log.info("nats: reconnected")

    async def close(self) -> None:
        self._closing = True
        if self._nc is not None and not self._nc.is_closed:
            try:
                await self._nc.drain()
            except Exception:
                await self._nc.close()
        self._nc = None
        self._js = None

    # -- streams and consumers -------------------------------------------------------------

    async def ensure_streams(self) -> None:
        """Create (or update) the step and result streams; idempotent, safe from every process.

        On a locked bus only the creating roles (admin, gateway; shared.bus_roles) may: any
        other waits until the streams exist (`lego up` creates them before it starts anyone)."""
        try:
            if bus_roles.may_create_streams(self.settings.nats_user):
                await self._ensure_streams()
            else:
                await self.wait_streams()
        except (ServiceUnavailableError, NoRespondersError) as exc:
            raise ConnectionError(
                f"NATS at {self.settings.nats_url} has no JetStream: start nats-server with -js "
                "(lego up does) or point --nats-url at one that has it"
            ) from exc

    async def _ensure_streams(self) -> None:
        s = self.settings
        await self._ensure_stream(
            api.StreamConfig(
                name=subjects.STEP_STREAM,
                subjects=[subjects.STEP_SUBJECTS],
                retention=api.RetentionPolicy.WORK_QUEUE,
                storage=api.StorageType.FILE,
                max_age=s.step_stream_max_age_s,
                duplicate_window=s.duplicate_window_s,
                num_replicas=s.stream_replicas,
            )
        )
        await self._ensure_stream(
            api.StreamConfig(
                name=subjects.RESULT_STREAM,
                subjects=[subjects.RESULT_SUBJECTS],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                max_age=s.step_stream_max_age_s,
                duplicate_window=s.duplicate_window_s,
                num_replicas=s.stream_replicas,
            )
        )

    async def wait_streams(self, timeout_s: float = STREAMS_WAIT_S) -> None:
        """Until the step and result streams exist (made by a role that may create them)."""
        for stream in (subjects.STEP_STREAM, subjects.RESULT_STREAM):
            await self.wait_until_made(f"stream {stream}", partial(self.js.stream_info, stream), timeout_s)

    async def wait_until_made(
        self, what: str, look: Callable[[], Awaitable[T]], timeout_s: float = STREAMS_WAIT_S
    ) -> T:
        """`look()`'s answer once `what` (a stream or a bucket) exists: on a locked bus a role
        that may not make streams waits for one that may (the gateway, or `lego up` first)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout_s
        while True:
            try:
                return await look()
            except NotFoundError:  # a missing bucket's error is one too
                if loop.time() > give_up:
                    raise TimeoutError(
                        f"{what} does not exist after {timeout_s:.0f}s; user {self.settings.nats_user} "
                        "may not create it: start the gateway (it does) first"
                    ) from None
                await asyncio.sleep(0.5)

    async def _ensure_stream(self, config: api.StreamConfig) -> None:
        try:
            await self.js.add_stream(config)
        except BadRequestError:
            # Exists with another config (e.g. a changed duplicate window): bring it in line.
            await self.js.update_stream(config)
        assert config.name is not None
        await self.wait_leader(config.name)

    async def create_bucket(self, bucket: str, **config: Any) -> KeyValue:
        """Make a KV bucket with `stream_replicas` copies and return it once it has a leader
        (on a cluster a new replicated stream elects one first: a write before then finds no
        one to answer it). `config`: the rest of nats.py's KeyValueConfig (ttl, history)."""
        kv = await self.js.create_key_value(bucket=bucket, replicas=self.settings.stream_replicas, **config)
        await self.wait_leader(f"KV_{bucket}")
        return kv

    async def wait_leader(self, stream: str, timeout_s: float = STREAMS_WAIT_S) -> None:
        """Until `stream` has a leader (at once on a single server, which leads every stream)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout_s
        while True:
            try:
                info = await self.js.stream_info(stream)
                if info.cluster is None or info.cluster.leader:
                    return
            except (TimeoutError, NoRespondersError, ServiceUnavailableError):
                pass  # no leader to answer yet
            if loop.time() > give_up:
                raise TimeoutError(f"stream {stream} elected no leader within {timeout_s:.0f}s")
            await asyncio.sleep(0.1)

    async def ensure_consumer(self, kind: StepKind | str, model_id: str, band: str = subjects.NORMAL_BAND) -> str:
        """The durable pull consumer of a (kind, model, band): created once, shared by all replicas."""
        durable = subjects.consumer_name(kind, model_id, band)
        config = api.ConsumerConfig(
            # `name` too: the create request's subject then names the consumer and its filter,
            # which is what a bus role's permission allows (shared.bus_roles).
            name=durable,
            durable_name=durable,
            filter_subject=subjects.step_subject(kind, model_id, band),
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.settings.ack_wait_s,
            max_deliver=self.settings.max_deliver,
            max_ack_pending=1000,
            deliver_policy=api.DeliverPolicy.ALL,
        )
        # The server's create is create-or-update: a changed ack wait from settings is applied.
        await self.js.add_consumer(subjects.STEP_STREAM, config)
        return durable

    async def consumer_backlog(self, kind: StepKind | str, model_id: str) -> tuple[int, int] | None:
        """(num_pending, num_ack_pending) of a model's consumers (every band's, summed), or None
        when none exists."""
        found, pending, ack_pending = False, 0, 0
        for band in subjects.BAND_NAMES:
            try:
                info = await self.js.consumer_info(subjects.STEP_STREAM, subjects.consumer_name(kind, model_id, band))
            except NotFoundError:
                continue
            found = True
            pending += info.num_pending or 0
            ack_pending += info.num_ack_pending or 0
        return (pending, ack_pending) if found else None

    async def step_consumers(self) -> list[ConsumerCounters]:
        """Every (kind, model)'s counters, its bands' consumers summed, in one request per page:
        what the autoscaler samples."""
        out: dict[tuple[str, str], ConsumerCounters] = {}
        for info in await self.js.consumers_info(subjects.STEP_STREAM):
            parsed = subjects.parse_consumer_name(info.name or "")
            if parsed is None:
                continue
            kind, model_id, band = parsed
            one = ConsumerCounters(
                kind=kind,
                model_id=model_id,
                pending=info.num_pending or 0,
                ack_pending=info.num_ack_pending or 0,
                delivered=info.delivered.consumer_seq if info.delivered and info.delivered.consumer_seq else 0,
            )
            out[(kind, model_id)] = out.get((kind, model_id), one._replace(pending=0, ack_pending=0, delivered=0)).plus(
                one, band
            )
        return list(out.values())

    async def pull_subscription(
        self, kind: StepKind | str, model_id: str, band: str = subjects.NORMAL_BAND
    ) -> JetStreamContext.PullSubscription:
        """A nats.py pull subscription on one band's consumer (the worker pulls through
        `priority_pull.PriorityPuller` instead, which serves the bands in order)."""
        durable = await self.ensure_consumer(kind, model_id, band)
        return await self.js.pull_subscribe_bind(durable=durable, stream=subjects.STEP_STREAM)

    # -- steps and results -------------------------------------------------------------------

    async def publish_step(self, step: StepRequest, headers: dict[str, str] | None = None) -> int:
        """Publish a step on its priority band's subject; returns its stream sequence (named by
        max-delivery advisories).

        The step carries a trace context (`traceparent`): the one in `headers`, else the current one."""
        hdrs = {NATS_MSG_ID: subjects.step_msg_id(step.request_id, step.node_id, step.attempt)}
        hdrs.update(headers or {})
        if tracing.TRACEPARENT not in hdrs:
            tracing.inject(hdrs)
        ack = await self.publish_acked(
            subjects.step_subject(step.kind, step.model_id, subjects.band_of(step.priority)),
            step.model_dump_json().encode(),
            hdrs,
        )
        return ack.seq

    async def publish_acked(self, subject: str, payload: bytes, headers: dict[str, str]) -> api.PubAck:
        """A JetStream publish, sent again on a fault a cluster recovers from (a server down, a
        stream electing its leader) until `publish_retry_s` has passed. Safe because every
        publish of ours carries a `Nats-Msg-Id`: JetStream keeps one copy however many land."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.settings.publish_retry_s
        pause = 0.05
        tries = 0
        while True:
            tries += 1
            try:
                if self._fast_requests:
                    ack = await nats_handoff.js_publish(self.nc, subject, payload, headers, JS_TIMEOUT_S)
                else:
                    ack = await self.js.publish(subject, payload, headers=headers)
            except PUBLISH_FAULTS as exc:
                if self._closing or loop.time() + pause > give_up:
                    raise
                if tries == 1:
                    log.warning("publish on %s: %s; sending again", subject, type(exc).__name__)
                await asyncio.sleep(pause)
                pause = min(pause * 2, PUBLISH_RETRY_MAX_WAIT_S)
                continue
            if tries > 1:
                log.info("publish on %s went through after %d tries", subject, tries)
            return ack

    async def subscribe_exhausted_steps(self, handler: Callable[[int, int], Awaitable[None]]) -> None:
        """Call `handler(stream_seq, deliveries)` when JetStream gives up on a step after MaxDeliver
        (e.g. every replica that took it died): the gateway turns that into an error, not a hang."""

        async def on_msg(msg: Msg) -> None:
            try:
                event = json.loads(msg.data)
                await handler(int(event["stream_seq"]), int(event.get("deliveries", 0)))
            except (ValueError, KeyError, TypeError):
                log.warning("dropping malformed max-deliveries advisory")

        await self.nc.subscribe(subjects.max_deliveries_advisory(), cb=on_msg)

    async def publish_result(self, subject: str, result: StepResult) -> bool:
        """Publish a node's result once; False when JetStream saw this node's result already."""
        ack = await self.publish_acked(
            subject,
            result.model_dump_json().encode(),
            {NATS_MSG_ID: subjects.result_msg_id(result.request_id, result.node_id, result.attempt)},
        )
        return not ack.duplicate

    async def subscribe_results(
        self, gateway_id: str, handler: Callable[[StepResult], Awaitable[None]], since: float | None = None
    ) -> JetStreamContext.PushSubscription:
        """Deliver `gateway_id`'s results to `handler`, in order: new ones only, or with `since`
        (a Unix time) every one stored from then on, which is how a gateway that adopts a dead
        one's requests learns the steps they finished (services/gateway/leases.py); across a
        NATS server's death too (nats.py's ordered consumer, remade where it left off)."""

        async def on_msg(msg: Msg) -> None:
            try:
                result = StepResult.model_validate_json(msg.data)
            except ValueError as exc:
                log.warning("dropping malformed result on %s: %s", msg.subject, exc)
                return
            await handler(result)

        if since is None:
            config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.NEW)
        else:
            start = datetime.datetime.fromtimestamp(since, datetime.UTC)
            config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_TIME, opt_start_time=start)
        return await self.js.subscribe(
            subjects.result_subject(gateway_id),
            cb=on_msg,
            ordered_consumer=True,
            config=config,
            # The ordered consumer lives on one server: when that server dies the client notices
            # only by missed heartbeats (two), then makes it again from the next result it lacks.
            idle_heartbeat=RESULTS_HEARTBEAT_S,
        )

    # -- best-effort notices (core NATS) --------------------------------------------------------

    async def publish_progress(self, subject: str, progress: StepProgress) -> None:
        await self.nc.publish(subject, progress.model_dump_json().encode())

    async def subscribe_progress(self, gateway_id: str, handler: Callable[[StepProgress], Awaitable[None]]) -> None:
        async def on_msg(msg: Msg) -> None:
            try:
                await handler(StepProgress.model_validate_json(msg.data))
            except ValueError:
                log.warning("dropping malformed progress message")

        await self.nc.subscribe(subjects.progress_subject(gateway_id), cb=on_msg)

    async def publish_release(self, request_id: str) -> None:
        await self.nc.publish(
            subjects.RELEASE_SUBJECT, ReleaseTensors(request_id=request_id).model_dump_json().encode()
        )

    async def publish_cancel(self, request_id: str) -> None:
        await self.nc.publish(subjects.CANCEL_SUBJECT, request_id.encode())

    async def subscribe_cancel(self, handler: Callable[[str], object]) -> None:
        """Call `handler(request_id)` when a request is cancelled, so its steps stop or are dropped."""

        async def on_msg(msg: Msg) -> None:
            handler(msg.data.decode(errors="replace"))

        await self.nc.subscribe(subjects.CANCEL_SUBJECT, cb=on_msg)

    async def publish_lora_prefetch(self, model_id: str, loras: list[LoraChoice]) -> None:
        """Tell `model_id`'s denoisers to start reading these LoRAs (core NATS: a hint, lost if nobody listens)."""
        payload = json.dumps([lora.model_dump() for lora in loras]).encode()
        await self.nc.publish(subjects.lora_prefetch_subject(model_id), payload)

    async def subscribe_lora_prefetch(self, model_id: str, handler: Callable[[list[LoraChoice]], object]) -> None:
        """Call `handler(loras)` for each prefetch hint to `model_id` (on the event loop: hand work off)."""

        async def on_msg(msg: Msg) -> None:
            try:
                loras = [LoraChoice.model_validate(x) for x in json.loads(msg.data)]
            except (ValueError, TypeError):
                log.warning("dropping a malformed LoRA prefetch hint")
                return
            handler(loras)

        await self.nc.subscribe(subjects.lora_prefetch_subject(model_id), cb=on_msg)

    async def publish_admitted(self, steps: list[tuple[str, str]]) -> None:
        """Tell the autoscaler a request was admitted, with the (kind, model) of each step it
        will publish (core NATS: a hint; nobody listening, or a reconnect, loses it)."""
        await self.nc.publish(subjects.ADMITTED_SUBJECT, json.dumps(steps).encode())

    async def subscribe_admitted(self, handler: Callable[[list[tuple[str, str]]], object]) -> None:
        """Call `handler(steps)` for each admitted request (on the event loop: it must be quick)."""

        async def on_msg(msg: Msg) -> None:
            try:
                steps = [(str(kind), str(model)) for kind, model in json.loads(msg.data)]
            except (ValueError, TypeError):
                log.warning("dropping a malformed admission notice")
                return
            handler(steps)

        await self.nc.subscribe(subjects.ADMITTED_SUBJECT, cb=on_msg)

    async def subscribe_release(self, handler: Callable[[str], object]) -> None:
        """Call `handler(request_id)` whenever a request ends, so its tensors can be freed."""

        async def on_msg(msg: Msg) -> None:
            try:
                handler(ReleaseTensors.model_validate_json(msg.data).request_id)
            except ValueError:
                log.warning("dropping malformed release notice")

        await self.nc.subscribe(subjects.RELEASE_SUBJECT, cb=on_msg)
