"""Request records in JetStream, so that no gateway holds a request alone: any gateway answers
`GET`, `/events` and `DELETE` for any request, and a survivor can finish a dead gateway's.

What is stored, and when (the hot path gains no KV round trip per step):
- the record (`LEGO_REQUESTS`, one KV entry a request, keyed by owner and request id): the plan
  (workflow, each node's step params), owner, deadline, how to answer (seed, format, delivery),
  the gateway driving it; written when the request starts (one create) and when it ends (its
  status, error, and answer body), never per step;
- its events (`lego.events.<run id>` in the `LEGO_EVENTS` stream): published as they happen,
  without waiting for an ack, so another gateway can stream them or rebuild the progress;
- finished steps and their tensor references need no copy: the results stream
  (`lego.result.<gateway>`) holds them already, and an adopter replays it (orchestrator.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from nats.js import api
from nats.js.errors import (
    BadRequestError,
    BucketNotFoundError,
    InvalidKeyError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import BaseModel, Field

from services.gateway.request_state import Owner, RequestState, RunStatus
from shared import subjects
from shared.bus import Bus
from shared.messages import PARAMS_OF_KIND, ErrorInfo, StepParams
from shared.workflows.spec import WorkflowSpec

log = logging.getLogger("lego.gateway")
EVENTS_QUEUE = 10000  # events waiting to be published; more are dropped (they are best effort)


class AnswerSpec(BaseModel):
    """How the request's images are answered, so whichever gateway finishes it answers alike."""

    seed: int = 0
    format: str = "png"
    quality: int = 90
    response_format: str = "b64_json"
    base_url: str = ""


class RequestRecord(BaseModel):
    """One request as every gateway sees it."""

    request_id: str
    run_id: str
    owner_key_id: str = ""
    owner_name: str = ""
    workflow: WorkflowSpec
    params: dict[str, dict[str, Any]]
    priority: int = 0
    timeout_s: float | None = None
    deadline: float
    created: float
    gateway: str  # the gateway driving it (or that finished it)
    status: str = RunStatus.RUNNING.value
    error: ErrorInfo | None = None
    result: dict[str, Any] | None = None  # the answer body, once it succeeded
    answer: AnswerSpec = Field(default_factory=AnswerSpec)

    @property
    def running(self) -> bool:
        return self.status == RunStatus.RUNNING.value

    @property
    def key(self) -> str:
        return record_key(self.owner_key_id, self.request_id)


def record_key(owner_key_id: str, request_id: str) -> str:
    """The record's KV key: each API key has its own request ids (`_` when auth is off)."""
    return f"{owner_key_id or '_'}.{request_id}"


def record_of(state: RequestState, gateway: str, answer: AnswerSpec) -> RequestRecord:
    return RequestRecord(
        request_id=state.request_id,
        run_id=state.run_id,
        owner_key_id=state.owner.key_id,
        owner_name=state.owner.name,
        workflow=state.workflow,
        params={node: p.model_dump(mode="json") for node, p in state.params.items()},
        priority=state.priority,
        timeout_s=state.timeout_s,
        deadline=state.deadline,
        created=state.created,
        gateway=gateway,
        status=state.status.value,
        error=state.error,
        result=state.result,
        answer=answer,
    )


def state_of(record: RequestRecord) -> RequestState:
    """A `RequestState` rebuilt from a record: to adopt it, or to answer for it (a view)."""
    params: dict[str, StepParams] = {
        n.id: PARAMS_OF_KIND[n.kind].model_validate(record.params[n.id])  # type: ignore[misc]
        for n in record.workflow.nodes
    }
    state = RequestState(
        request_id=record.request_id,
        workflow=record.workflow,
        params=params,
        deadline=record.deadline,
        owner=Owner(record.owner_key_id, record.owner_name),
        priority=record.priority,
        timeout_s=record.timeout_s,
        created=record.created,
        run_id=record.run_id,
    )
    state.error, state.result = record.error, record.result
    if not record.running:
        state.move_to(RunStatus(record.status))
    return state


def apply_event(state: RequestState, event: dict[str, Any]) -> None:
    """Replay one stored event onto a view of a request (what `GET` shows of its progress)."""
    kind = event.get("type")
    node = str(event.get("node", ""))
    if kind == "node" and event.get("state") == "running":
        state.nodes.started.add(node)
    elif kind == "node" and event.get("state") == "done":
        state.nodes.done.add(node)
        state.nodes.replicas[node] = str(event.get("replica", ""))
        state.nodes.compute_s[node] = float(event.get("compute_s", 0.0))
    elif kind == "progress":
        state.denoising.step, state.denoising.total = int(event["step"]), int(event["total"])
    state.log.events.append(event)


class RequestStore:
    """The buckets and the event stream of request records; one a gateway."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.settings = bus.settings
        self._records: KeyValue | None = None
        self._events: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(EVENTS_QUEUE)
        self._publisher: asyncio.Task[None] | None = None

    @property
    def records(self) -> KeyValue:
        if self._records is None:
            raise RuntimeError("RequestStore.start() was not called")
        return self._records

    async def start(self) -> None:
        self._records = await bucket(self.bus, subjects.REQUESTS_BUCKET, self.settings.request_record_ttl_s)
        config = api.StreamConfig(
            name=subjects.EVENT_STREAM,
            subjects=[subjects.EVENT_SUBJECTS],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_age=self.settings.event_ttl_s,
            num_replicas=self.settings.stream_replicas,
        )
        try:
            await self.bus.js.add_stream(config)
        except BadRequestError:
            await self.bus.js.update_stream(config)
        self._publisher = asyncio.create_task(self._publish_events(), name="record-events")

    async def close(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher

    async def claim(self, record: RequestRecord) -> RequestRecord | None:
        """Store a new request's record; None when stored, else the running request that holds
        its key already (the caller answers 409, or follows it)."""
        value = record.model_dump_json().encode()
        try:
            await self.records.create(record.key, value)
            return None
        except KeyWrongLastSequenceError:
            pass
        entry = await self._entry(record.key)
        if entry is not None:
            earlier = RequestRecord.model_validate_json(entry.value or b"{}")
            if earlier.running:
                return earlier
        try:  # an earlier, finished request of this id: this one replaces it
            await self.records.update(record.key, value, last=entry.revision if entry else 0)
        except KeyWrongLastSequenceError:
            racing = await self.load(record.key)
            if racing is not None and racing.running:
                return racing
            await self.records.put(record.key, value)
        return None

    async def discard(self, key: str) -> None:
        """Delete the record of a request that never started (best effort: the bus may be the
        reason it did not; a record left behind expires with the bucket's TTL)."""
        with contextlib.suppress(Exception):
            await self.records.delete(key)

    async def save(self, record: RequestRecord) -> None:
        await self.records.put(record.key, record.model_dump_json().encode())

    async def load(self, key: str) -> RequestRecord | None:
        entry = await self._entry(key)
        if entry is None:
            return None
        try:
            return RequestRecord.model_validate_json(entry.value or b"")
        except ValueError:
            log.warning("ignoring a malformed request record %r", key)
            return None

    async def _entry(self, key: str) -> KeyValue.Entry | None:
        try:
            entry = await self.records.get(key)
        except (KeyNotFoundError, InvalidKeyError):  # an id no request can have (GET /v1/requests/a.b)
            return None
        if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
            return None
        return entry

    async def until_ended(self, key: str, timeout_s: float) -> RequestRecord | None:
        """The record of `key` once its request has ended (None if it did not within `timeout_s`,
        or never existed by then): what a gateway that does not drive a request waits on."""
        watcher = await self.records.watch(key)
        last: RequestRecord | None = None
        try:
            async with asyncio.timeout(timeout_s):
                async for entry in watcher:
                    if entry is None or entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                        continue
                    last = RequestRecord.model_validate_json(entry.value)
                    if not last.running:
                        return last
        except TimeoutError:
            return None
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
        return last

    def emit(self, run_id: str, event: dict[str, Any]) -> None:
        """Publish one event of `run_id` (in order, without waiting: best effort, like progress)."""
        payload = json.dumps(event).encode()
        if len(payload) > self.bus.nc.max_payload - 1024:  # a result of large images: the status has them
            payload = json.dumps({**event, "data": [], "images_dropped": True}).encode()
        try:
            self._events.put_nowait((subjects.event_subject(run_id), payload))
        except asyncio.QueueFull:
            log.warning("event queue full: dropping an event of %s", run_id)

    async def _publish_events(self) -> None:
        while True:
            subject, payload = await self._events.get()
            try:
                await self.bus.nc.publish(subject, payload)
            except Exception as exc:
                log.warning("publishing an event failed: %s", exc)

    async def events(self, run_id: str) -> list[dict[str, Any]]:
        """Every stored event of `run_id` so far (to rebuild a running request's progress)."""
        out: list[dict[str, Any]] = []
        async for event in self.follow_events(run_id, until_caught_up=True):
            out.append(event)
        return out

    async def follow_events(self, run_id: str, until_caught_up: bool = False, idle_s: float = 15.0):  # type: ignore[no-untyped-def]
        """Yield `run_id`'s events from the first, as they come (None after `idle_s` of quiet:
        a heartbeat); with `until_caught_up`, only those stored now."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def on_msg(msg: Any) -> None:
            with contextlib.suppress(ValueError):
                queue.put_nowait(json.loads(msg.data))

        sub = await self.bus.js.subscribe(
            subjects.event_subject(run_id),
            cb=on_msg,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.ALL,
        )
        try:
            if until_caught_up:
                info = await self.bus.js.stream_info(
                    subjects.EVENT_STREAM, subjects_filter=subjects.event_subject(run_id)
                )
                stored = sum((info.state.subjects or {}).values())
                give_up = time.monotonic() + 5.0
                while stored and time.monotonic() < give_up:
                    try:
                        yield await asyncio.wait_for(queue.get(), timeout=max(0.01, give_up - time.monotonic()))
                    except TimeoutError:
                        return
                    stored -= 1
                return
            while True:
                try:
                    yield await asyncio.wait_for(queue.get(), timeout=idle_s)
                except TimeoutError:
                    yield None
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


async def view(store: RequestStore | None, key: str) -> RequestState | None:
    """A request another gateway drives (or finished), as its record and events show it; None
    for an unknown one. The view is marked handed over: nothing here drives it."""
    if store is None:
        return None
    record = await store.load(key)
    if record is None:
        return None
    state = state_of(record)
    state.handed_over = True
    if record.running:
        for event in await store.events(record.run_id):
            apply_event(state, event)
    return state


async def bucket(bus: Bus, name: str, ttl_s: float | None) -> KeyValue:
    """A KV bucket of the gateways, made by the first that needs it."""
    try:
        return await bus.js.key_value(name)
    except BucketNotFoundError:
        return await bus.js.create_key_value(bucket=name, history=1, ttl=ttl_s, replicas=bus.settings.stream_replicas)
