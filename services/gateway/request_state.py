"""One request's state: its status (moved only through one table of allowed transitions), what
each of its nodes did, its denoising progress and the events `/events` streams.

Why a table: a status set from several places drifts (a cancelled request "succeeding" when a
late result arrives); with every change going through `move_to`, an impossible move is a loud
error instead of a wrong answer.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from shared import tracing
from shared.messages import ErrorInfo, StepKind, StepParams, TensorRef
from shared.workflows.spec import WorkflowSpec


class RunStatus(StrEnum):
    """A request's status, as the API shows it (`RequestStatus.status` in the schemas)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.RUNNING: frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED}),
    # Reopened: the replica holding its images died before the gateway pulled them, so the
    # output node runs again (a re-plan).
    RunStatus.SUCCEEDED: frozenset({RunStatus.RUNNING}),
    RunStatus.FAILED: frozenset(),
    RunStatus.CANCELLED: frozenset(),
}


@dataclass(frozen=True)
class Owner:
    """The API key that made a request: its id (whose requests a key may see) and its name (what
    usage metrics are labelled by). Empty when auth is off: everyone sees every request."""

    key_id: str = ""
    name: str = ""


NO_OWNER = Owner()


class InvalidTransition(RuntimeError):
    """A status change the table does not allow: a bug in the gateway, never the client's doing."""


@dataclass
class NodeRuns:
    """What each node of the request did: started, done, its outputs, where and how long it ran,
    and the attempt it is on (a node re-runs when the outputs it needs were lost)."""

    started: set[str] = field(default_factory=set)
    done: set[str] = field(default_factory=set)
    outputs: dict[str, dict[str, TensorRef]] = field(default_factory=dict)
    replicas: dict[str, str] = field(default_factory=dict)  # node -> replica that ran it
    compute_s: dict[str, float] = field(default_factory=dict)  # node -> seconds in the model
    wall_s: dict[str, float] = field(default_factory=dict)  # node -> publish-to-result seconds
    published_at: dict[str, float] = field(default_factory=dict)
    step_seqs: list[int] = field(default_factory=list)  # stream sequences of published steps
    attempts: dict[str, int] = field(default_factory=dict)  # node -> current attempt (re-plans)
    replans: int = 0

    def attempt(self, node_id: str) -> int:
        return self.attempts.get(node_id, 1)

    def rerun(self, node_ids: set[str]) -> None:
        """Forget what `node_ids` did and move each to its next attempt."""
        self.replans += 1
        for node_id in node_ids:
            self.done.discard(node_id)
            self.started.discard(node_id)
            self.outputs.pop(node_id, None)
            self.attempts[node_id] = self.attempt(node_id) + 1

    def status(self, workflow: WorkflowSpec) -> dict[str, str]:
        """node -> done / running / waiting, in the workflow's order."""
        return {
            n.id: "done" if n.id in self.done else "running" if n.id in self.started else "waiting"
            for n in workflow.nodes
        }


@dataclass
class Denoising:
    """The denoiser's progress: the step it last reported, of how many."""

    step: int = 0
    total: int = 0


@dataclass
class EventLog:
    """What `/events` streams, in order; listeners wait on `changed`, which is set (and replaced)
    on each event, so each waits on the Event it saw last."""

    created: float
    events: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # Where each event is published too (the event stream, so any gateway can stream it); None: nowhere.
    sink: Callable[[dict[str, Any]], None] | None = None

    def emit(self, event: dict[str, Any]) -> None:
        """Record an event and wake every listener."""
        event = {"seq": len(self.events), "elapsed_s": round(time.time() - self.created, 3), **event}
        self.events.append(event)
        if self.sink is not None:
            self.sink(event)
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


def _new_future() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()


@dataclass
class RequestState:
    """One request. `request_id` is the client's handle; `run_id` names this run on the bus, so a
    client re-sending the same id never collides with JetStream's dedupe of an earlier run."""

    request_id: str
    workflow: WorkflowSpec
    params: dict[str, StepParams]  # each node's typed step params, by node id
    deadline: float
    owner: Owner = NO_OWNER
    priority: int = 0  # 0-9: its steps' band (higher served first), carried by every step it publishes
    timeout_s: float | None = None  # the deadline the client set (None: the server's request timeout)
    created: float = field(default_factory=time.time)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: RunStatus = field(default=RunStatus.RUNNING, init=False)  # changed only by `move_to`
    error: ErrorInfo | None = None
    result: dict[str, Any] | None = None  # the answer body of a finished request, for async callers
    nodes: NodeRuns = field(default_factory=NodeRuns)
    denoising: Denoising = field(default_factory=Denoising)
    log: EventLog = field(init=False)
    finished: asyncio.Future[None] = field(default_factory=_new_future)  # resolved when it leaves running
    trace: tracing.Scope = field(default_factory=tracing.Scope)  # its root span while it runs (tracing on)
    # Handed to another gateway (this one drains): it no longer drives the request, and its
    # waiters follow the request's record instead (`finished` resolves with the status still running).
    handed_over: bool = False

    def __post_init__(self) -> None:
        self.log = EventLog(created=self.created)

    def move_to(self, status: RunStatus) -> None:
        """The one way to change the status (raises InvalidTransition off the table). Leaving
        running resolves `finished`; reopening gives the request a new one to wait on."""
        if status not in TRANSITIONS[self.status]:
            raise InvalidTransition(f"request {self.request_id}: {self.status} -> {status} is not allowed")
        self.status = status
        if status is RunStatus.RUNNING:
            self.finished = _new_future()
        elif not self.finished.done():
            self.finished.set_result(None)

    @property
    def running(self) -> bool:
        return self.status is RunStatus.RUNNING

    def progress(self) -> str:
        """Where the request is, for a message: the denoising step, or the nodes it waits on."""
        in_flight = [n for n in self.workflow.nodes if n.id in self.nodes.started and n.id not in self.nodes.done]
        denoiser = next((n.model for n in in_flight if n.kind == StepKind.DENOISE), None)
        if denoiser is not None and self.denoising.total:
            return f"step {self.denoising.step}/{self.denoising.total} of {denoiser}"
        if in_flight:
            return "waiting for " + ", ".join(f"{n.id} ({n.model})" for n in in_flight)
        return f"{len(self.nodes.done)} of {len(self.workflow.nodes)} steps done"
