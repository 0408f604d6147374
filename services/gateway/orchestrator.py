"""The gateway's request scheduler: owns every request's state and moves it through its DAG.

A request is planned from its workflow spec; ready nodes are published as steps; each result
records the node's output refs and publishes the nodes it unblocks; the output node's images
are pulled through the tensor plane. Nobody else mutates a request's state.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from shared import metrics, subjects, tracing
from shared.bus import Bus
from shared.messages import ErrorInfo, StepKind, StepProgress, StepRequest, StepResult, TensorRef
from shared.settings import Settings
from shared.tensor_plane import RawTensor, TensorPlane, TensorUnavailable
from shared.workflows.planner import WorkflowError, ready_nodes, split_ref, wire_inputs
from shared.workflows.spec import REQUEST, WorkflowSpec

log = logging.getLogger("lego.gateway")

KEEP_FINISHED = 1000  # finished requests kept for status queries
MAX_REPLANS = 3  # re-runs of nodes whose outputs were lost (their replica died), per request


class RequestFailed(Exception):
    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass
class RequestState:
    """One request. `request_id` is the client's handle; `run_id` names this run on the bus, so a
    client re-sending the same id never collides with JetStream's dedupe of an earlier run."""

    request_id: str
    workflow: WorkflowSpec
    params: dict[str, Any]
    deadline: float
    created: float = field(default_factory=time.time)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: Literal["running", "succeeded", "failed", "cancelled"] = "running"
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
    step: int = 0
    total_steps: int = 0
    error: ErrorInfo | None = None
    finished: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    events: list[dict[str, Any]] = field(default_factory=list)  # what /events streams, in order
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set (and replaced) on each event
    result: dict[str, Any] | None = None  # the answer body of a finished request, for async callers
    trace: tracing.Scope = field(default_factory=tracing.Scope)  # its root span while it runs (tracing on)

    def emit(self, event: dict[str, Any]) -> None:
        """Record an event and wake every listener (each waits on the Event it saw last)."""
        event = {"seq": len(self.events), "elapsed_s": round(time.time() - self.created, 3), **event}
        self.events.append(event)
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    @property
    def ended(self) -> bool:
        """True once the terminal event (result or error) was emitted."""
        return bool(self.events) and self.events[-1]["type"] in ("result", "error")

    def node_status(self) -> dict[str, str]:
        return {
            n.id: "done" if n.id in self.done else "running" if n.id in self.started else "waiting"
            for n in self.workflow.nodes
        }


class Orchestrator:
    def __init__(self, bus: Bus, plane: TensorPlane, settings: Settings) -> None:
        self.bus = bus
        self.plane = plane
        self.settings = settings
        self.gateway_id = settings.gateway_id
        self.requests: OrderedDict[str, RequestState] = OrderedDict()  # by client id, for status
        self.runs: dict[str, RequestState] = {}  # by run id, while running
        self._step_seqs: dict[int, tuple[str, str]] = {}  # stream seq -> (request, node) in flight

    async def start(self) -> None:
        await self.bus.subscribe_results(self.gateway_id, self._on_result)
        await self.bus.subscribe_progress(self.gateway_id, self._on_progress)
        await self.bus.subscribe_exhausted_steps(self._on_exhausted)

    def get(self, request_id: str) -> RequestState | None:
        return self.requests.get(request_id)

    async def run(
        self,
        request_id: str,
        workflow: WorkflowSpec,
        params: dict[str, Any],
        tensors: dict[str, RawTensor] | None = None,
    ) -> RawTensor:
        """Run one request to its output tensor, or raise RequestFailed / TimeoutError."""
        return await self.execute(self.create(request_id, workflow, params), tensors)

    def create(
        self, request_id: str, workflow: WorkflowSpec, params: dict[str, Any], timeout_s: float | None = None
    ) -> RequestState:
        """Register a request (so it can be followed and cancelled) before it runs; its deadline
        is `timeout_s` from now (default: the server's request timeout)."""
        if request_id in self.requests and self.requests[request_id].status == "running":
            raise RequestFailed(ErrorInfo(code="duplicate_request", message=f"request {request_id} is running"))
        state = RequestState(
            request_id=request_id,
            workflow=workflow,
            params=params,
            deadline=time.time() + (timeout_s or self.settings.request_timeout_s),
        )
        self._remember(state)
        self.runs[state.run_id] = state
        state.emit({"type": "queued", "workflow": workflow.name})
        return state

    async def execute(self, state: RequestState, tensors: dict[str, RawTensor] | None = None) -> RawTensor:
        """Drive a created request to its output tensor, or raise RequestFailed / TimeoutError.

        `tensors` are what the request itself carries (a control image): served from this
        gateway's tensor plane to the nodes that read `request.<name>`."""
        workflow = state.workflow
        carried = tensors or {}
        state.outputs[REQUEST] = {name: self.plane.put(raw, owner=state.run_id) for name, raw in carried.items()}
        out_node, output = split_ref(workflow.output)
        state.trace = tracing.begin(
            f"generate {workflow.name}",
            {"lego.workflow": workflow.name, "lego.request_id": state.request_id, "lego.run_id": state.run_id},
        )
        metrics.request_started(workflow.name)
        try:
            await self._advance(state)
            while True:
                await asyncio.wait_for(asyncio.shield(state.finished), timeout=max(0.0, state.deadline - time.time()))
                if state.error is not None:
                    raise RequestFailed(state.error)
                try:
                    return await self.plane.get(state.outputs[out_node][output])
                except (KeyError, TensorUnavailable) as exc:
                    # The replica that decoded the images died before we pulled them: decode again.
                    if not self._replan(state, {out_node}):
                        raise RequestFailed(
                            ErrorInfo(code="output_unavailable", message=str(exc), retryable=True)
                        ) from exc
                    await self._advance(state)
        except TimeoutError:
            self._fail(
                state,
                ErrorInfo(
                    code="deadline_exceeded",
                    message=f"no result within {state.deadline - state.created:.0f}s; the mesh may lack replicas",
                    retryable=True,
                ),
            )
            raise
        except asyncio.CancelledError:  # the client went away: free the mesh's work for it
            self._fail(state, ErrorInfo(code="cancelled", message="the client disconnected"))
            await self.bus.publish_cancel(state.run_id)
            raise
        finally:
            status = "failed" if state.status == "running" else state.status
            state.trace.close({"lego.status": status}, error=state.error.code if state.error else None)
            metrics.request_finished(workflow.name, status, time.time() - state.created)
            for seq in state.step_seqs:
                self._step_seqs.pop(seq, None)
            self.runs.pop(state.run_id, None)
            self.plane.release(state.run_id)
            await self.bus.publish_release(state.run_id)

    def _remember(self, state: RequestState) -> None:
        self.requests[state.request_id] = state
        self.requests.move_to_end(state.request_id)
        while len(self.requests) > KEEP_FINISHED:
            oldest_id, oldest = next(iter(self.requests.items()))
            if oldest.status == "running":
                break
            del self.requests[oldest_id]

    async def _advance(self, state: RequestState) -> None:
        """Publish every node whose inputs are ready, concurrently (parallel branches start together)."""
        steps = []
        for node in ready_nodes(state.workflow, state.done, state.started):
            try:
                inputs = wire_inputs(node, state.outputs)
            except WorkflowError as exc:
                self._fail(state, ErrorInfo(code="workflow_error", message=str(exc)))
                return
            step = StepRequest(
                request_id=state.run_id,
                node_id=node.id,
                kind=node.kind,
                model_id=node.model,
                params={**node.settings, **{k: state.params[k] for k in node.params if k in state.params}},
                inputs=inputs,
                reply_to=subjects.result_subject(self.gateway_id),
                progress_to=subjects.progress_subject(self.gateway_id),
                deadline=state.deadline,
                attempt=state.attempts.get(node.id, 1),
            )
            state.started.add(node.id)
            state.published_at[node.id] = time.perf_counter()
            state.emit({"type": "node", "node": node.id, "state": "running", "attempt": step.attempt})
            steps.append(step)
        seqs = await asyncio.gather(*(self.bus.publish_step(step, state.trace.headers) for step in steps))
        for step, seq in zip(steps, seqs, strict=True):
            self._step_seqs[seq] = (state.run_id, step.node_id)
            state.step_seqs.append(seq)

    async def _on_result(self, result: StepResult) -> None:
        state = self.runs.get(result.request_id)
        if state is None or state.status != "running" or result.node_id in state.done:
            return  # unknown, finished, or a duplicate: results are idempotent
        if result.attempt != state.attempts.get(result.node_id, 1):
            return  # an answer to an attempt that was re-planned since
        state.replicas[result.node_id] = result.replica_id
        state.compute_s[result.node_id] = round(result.compute_s, 4)
        state.wall_s[result.node_id] = round(time.perf_counter() - state.published_at[result.node_id], 4)
        if not result.ok:
            error = result.error or ErrorInfo(code="step_failed", message="a step failed")
            if error.code == "input_lost" and self._replan_lost_inputs(state, result.node_id, error.lost_inputs):
                await self._advance(state)
                return
            self._fail(state, error)
            return
        state.done.add(result.node_id)
        state.outputs[result.node_id] = result.outputs
        state.emit(
            {
                "type": "node",
                "node": result.node_id,
                "state": "done",
                "replica": result.replica_id,
                "compute_s": state.compute_s[result.node_id],
            }
        )
        out_node, _ = split_ref(state.workflow.output)
        if out_node in state.done:
            state.status = "succeeded"
            state.finished.set_result(None)
            return
        await self._advance(state)

    def _replan_lost_inputs(self, state: RequestState, node_id: str, lost: list[str]) -> bool:
        node = state.workflow.node(node_id)
        producers = {split_ref(node.inputs[name])[0] for name in lost if name in node.inputs} - {REQUEST}
        return bool(producers) and self._replan(state, producers | {node_id})

    def _replan(self, state: RequestState, nodes: set[str]) -> bool:
        """Run `nodes` again under a new attempt number (their outputs were lost with a replica)."""
        if state.replans >= MAX_REPLANS:
            return False
        state.replans += 1
        if state.status == "succeeded":  # its images were lost before we pulled them: reopen it
            state.status = "running"
            state.finished = asyncio.get_running_loop().create_future()
        for node_id in nodes:
            state.done.discard(node_id)
            state.started.discard(node_id)
            state.outputs.pop(node_id, None)
            state.attempts[node_id] = state.attempts.get(node_id, 1) + 1
        log.info("request %s: re-running %s, whose outputs were lost", state.request_id, sorted(nodes))
        return True

    async def _on_exhausted(self, seq: int, deliveries: int) -> None:
        run_id, node_id = self._step_seqs.pop(seq, ("", ""))
        state = self.runs.get(run_id)
        if state is not None and node_id not in state.done:
            message = f"step {node_id!r} was delivered {deliveries} times and never finished (its replicas died)"
            self._fail(state, ErrorInfo(code="step_exhausted", message=message, retryable=True))

    async def _on_progress(self, progress: StepProgress) -> None:
        state = self.runs.get(progress.request_id)
        if state is not None and state.status == "running" and progress.step != state.step:
            state.step, state.total_steps = progress.step, progress.total
            state.replicas[progress.node_id] = progress.replica_id
            state.emit({"type": "progress", "node": progress.node_id, "step": progress.step, "total": progress.total})

    async def cancel(self, request_id: str) -> RequestState | None:
        """Stop a running request: the denoiser leaves its loop at the next step, steps not yet
        started are dropped by the services, and its tensors are freed when `execute` returns."""
        state = self.requests.get(request_id)
        if state is None or state.status != "running":
            return state
        self._fail(state, ErrorInfo(code="cancelled", message="cancelled by the client (DELETE)"))
        await self.bus.publish_cancel(state.run_id)
        return state

    def queue_position(self, state: RequestState) -> int:
        """Requests ahead of this one for its base model, as this gateway sees them (0: it is
        being served, or has passed the denoiser)."""
        try:
            denoise = state.workflow.node_of_kind(StepKind.DENOISE)
        except KeyError:
            return 0
        if state.status != "running" or denoise.id in state.done or state.step > 0:
            return 0
        ahead = 0
        for other in self.runs.values():
            if other is state or other.created > state.created or other.status != "running":
                continue
            try:
                other_denoise = other.workflow.node_of_kind(StepKind.DENOISE)
            except KeyError:
                continue
            if other_denoise.model == denoise.model and other_denoise.id not in other.done:
                ahead += 1
        return ahead

    def _fail(self, state: RequestState, error: ErrorInfo) -> None:
        if state.status != "running":
            return
        state.status = "cancelled" if error.code == "cancelled" else "failed"
        state.error = error
        state.emit({"type": "error", "code": error.code, "message": error.message})
        if not state.finished.done():
            state.finished.set_result(None)
        log.info("request %s failed: %s %s", state.request_id, error.code, error.message)
