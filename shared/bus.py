"""The one JetStream bus wrapper: connection, streams, consumers, and typed publish/subscribe.

Steps go through a WorkQueue stream (file storage: a server restart loses nothing) with one
durable pull consumer per (kind, model, priority band) that every replica of the model shares
(`shared/priority_pull.py` pulls the bands, higher first). Results go
through a second stream whose `Nats-Msg-Id` dedupe makes a re-run of a node unable to deliver
a second result. Progress and tensor-release notices are best-effort core NATS messages.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, NotFoundError, ServiceUnavailableError

from shared import subjects, tracing
from shared.messages import ReleaseTensors, StepKind, StepProgress, StepRequest, StepResult
from shared.settings import Settings

log = logging.getLogger("lego.bus")

NATS_MSG_ID = "Nats-Msg-Id"


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
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout_s
        while True:
            try:
                self._nc = await nats.connect(
                    self.settings.nats_url,
                    name=self.name,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    connect_timeout=2,
                    drain_timeout=5,  # shutdown must not hang on a subscription stuck mid-fetch
                    allow_reconnect=True,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                )
                break
            except (OSError, nats.errors.NoServersError, TimeoutError) as exc:
                if loop.time() > give_up:
                    raise ConnectionError(
                        f"cannot reach NATS at {self.settings.nats_url}: {exc}. "
                        "Start nats-server with JetStream (-js) or point LEGO_NATS_URL / --nats-url at one."
                    ) from exc
                await asyncio.sleep(0.2)
        self._js = self._nc.jetstream(timeout=10)

    async def _on_error(self, exc: Exception) -> None:
        log.warning("nats: %s: %s", type(exc).__name__, exc)

    async def _on_disconnected(self) -> None:
        log.warning("nats: disconnected from %s; reconnecting", self.settings.nats_url)

    async def _on_reconnected(self) -> None:
        log.info("nats: reconnected")

    async def close(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            try:
                await self._nc.drain()
            except Exception:
                await self._nc.close()
        self._nc = None
        self._js = None

    # -- streams and consumers -------------------------------------------------------------

    async def ensure_streams(self) -> None:
        """Create (or update) the step and result streams; idempotent, safe from every process."""
        try:
            await self._ensure_streams()
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

    async def _ensure_stream(self, config: api.StreamConfig) -> None:
        try:
            await self.js.add_stream(config)
        except BadRequestError:
            # Exists with another config (e.g. a changed duplicate window): bring it in line.
            await self.js.update_stream(config)

    async def ensure_consumer(self, kind: StepKind | str, model_id: str, band: str = subjects.NORMAL_BAND) -> str:
        """The durable pull consumer of a (kind, model, band): created once, shared by all replicas."""
        durable = subjects.consumer_name(kind, model_id, band)
        config = api.ConsumerConfig(
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
        ack = await self.js.publish(
            subjects.step_subject(step.kind, step.model_id, subjects.band_of(step.priority)),
            step.model_dump_json().encode(),
            headers=hdrs,
        )
        return ack.seq

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
        ack = await self.js.publish(
            subject,
            result.model_dump_json().encode(),
            headers={NATS_MSG_ID: subjects.result_msg_id(result.request_id, result.node_id, result.attempt)},
        )
        return not ack.duplicate

    async def subscribe_results(
        self, gateway_id: str, handler: Callable[[StepResult], Awaitable[None]]
    ) -> JetStreamContext.PushSubscription:
        """Deliver this gateway's results (new ones only) to `handler`, in order."""

        async def on_msg(msg: Msg) -> None:
            try:
                result = StepResult.model_validate_json(msg.data)
            except ValueError as exc:
                log.warning("dropping malformed result on %s: %s", msg.subject, exc)
                return
            await handler(result)

        return await self.js.subscribe(
            subjects.result_subject(gateway_id),
            cb=on_msg,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.NEW,
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

    async def subscribe_release(self, handler: Callable[[str], object]) -> None:
        """Call `handler(request_id)` whenever a request ends, so its tensors can be freed."""

        async def on_msg(msg: Msg) -> None:
            try:
                handler(ReleaseTensors.model_validate_json(msg.data).request_id)
            except ValueError:
                log.warning("dropping malformed release notice")

        await self.nc.subscribe(subjects.RELEASE_SUBJECT, cb=on_msg)
