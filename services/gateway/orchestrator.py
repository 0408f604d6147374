"""The gateway's request scheduler: owns every request's state and moves it through its DAG.

A request is planned from its workflow spec; ready nodes are published as steps; each result
records the node's output refs and publishes the nodes it unblocks; the output node's images
are pulled through the tensor plane. Nobody else mutates a request's state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict

from services.gateway.leases import Leases
from services.gateway.records import AnswerSpec, RequestRecord, RequestStore, record_key, record_of, state_of
from services.gateway.request_state import NO_OWNER, Owner, RequestState, RunStatus
from shared import metrics, subjects, tracing
from shared.bus import Bus
from shared.messages import ErrorInfo, StepKind, StepParams, StepProgress, StepRequest, StepResult
from shared.settings import Settings
from shared.tensor_plane import RawTensor, TensorPlane, TensorUnavailable
from shared.workflows.planner import WorkflowError, ready_nodes, split_ref, wire_inputs
from shared.workflows.spec import REQUEST, NodeSpec, WorkflowSpec

log = logging.getLogger("lego.gateway")

KEEP_FINISHED = 1000  # finished requests kept for status queries
MAX_REPLANS = 3  # re-runs of nodes whose outputs were lost (their replica died), per request


CATCH_UP_S = 10.0  # an adopter waits this long at most for a dead gateway's stored results


class HandedOver(Exception):
    """This gateway handed the request to another (it drains): follow its record instead."""


class RequestFailed(Exception):
    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


class Orchestrator:
    def __init__(
        self,
        bus: Bus,
        plane: TensorPlane,
        settings: Settings,
        store: RequestStore | None = None,
        leases: Leases | None = None,
    ) -> None:
        """`store` and `leases` (both or neither): records in JetStream, so other gateways can
        answer for this one's requests and adopt them; without them, requests live here alone."""
        self.bus = bus
        self.store = store
        self.leases = leases
        self.answers: dict[str, AnswerSpec] = {}  # by run id: how to answer it (kept in its record)
        self._followed: set[str] = set()  # dead gateways whose results this one reads
        self.plane = plane
        self.settings = settings
        self.gateway_id = settings.gateway_id
        # By (owner key id, client id), for status: each key has its own ids, so one key can
        # neither see nor collide with another's requests.
        self.requests: OrderedDict[tuple[str, str], RequestState] = OrderedDict()
        self.runs: dict[str, RequestState] = {}  # by run id, while running
        self._step_seqs: dict[int, tuple[str, str]] = {}  # stream seq -> (request, node) in flight

    async def start(self) -> None:
        await self.bus.subscribe_results(self.gateway_id, self._on_result)
        await self.bus.subscribe_progress(self.gateway_id, self._on_progress)
        await self.bus.subscribe_exhausted_steps(self._on_exhausted)
        if self.store is not None:
            await self.bus.subscribe_cancel(self._on_cancel)  # a DELETE taken by another gateway

    # -- records in JetStream (services/gateway/records.py) ----------------------------------

    async def register(self, state: RequestState, answer: AnswerSpec) -> None:
        """Store a created request's record and take its lease (no-op without a store); raises
        RequestFailed(duplicate_request) when a request of that id runs on any gateway."""
        self.answers[state.run_id] = answer
        if self.store is None or self.leases is None:
            return
        earlier = await self.store.claim(record_of(state, self.gateway_id, answer))
        if earlier is not None:
            self._unmake(state)
            raise RequestFailed(ErrorInfo(code="duplicate_request", message=f"request {state.request_id} is running"))
        key = record_key(state.owner.key_id, state.request_id)
        try:
            await self.leases.hold(key)
        except BaseException:
            # Not started, and no gateway drives it: its record would have a retry (same
            # Idempotency-Key, any gateway) wait on a request that never runs. Undo both, so
            # the retry runs it afresh (the bus fault itself answers 503).
            self._unmake(state)
            await self.store.discard(key)
            raise
        self._publish_events(state)
        if self.leases.released:  # it came in as this gateway began to drain: a survivor adopts it
            self._let_go(state)

    def _unmake(self, state: RequestState) -> None:
        """Forget a created request that will not run here."""
        self.runs.pop(state.run_id, None)
        self.answers.pop(state.run_id, None)
        self.requests.pop((state.owner.key_id, state.request_id), None)

    def _publish_events(self, state: RequestState) -> None:
        """Send `state`'s events so far, and every later one, to the event stream."""
        if self.store is None:
            return
        store, run_id = self.store, state.run_id
        for event in state.log.events:
            store.emit(run_id, event)
        state.log.sink = lambda event: store.emit(run_id, event)

    async def save_end(self, state: RequestState) -> None:
        """Store how a request ended (its status, error, answer) and let go of its lease; not
        for a request handed to another gateway, which stores its end itself."""
        answer = self.answers.pop(state.run_id, AnswerSpec())
        if self.store is None or self.leases is None or state.handed_over:
            return
        key = record_key(state.owner.key_id, state.request_id)
        record = record_of(state, self.gateway_id, answer)  # now: before any await
        await asyncio.gather(self._save_final(state, record), self.leases.drop(key))

    async def _save_final(self, state: RequestState, record: RequestRecord) -> None:
        """The ended request's record; its images left out when they are over the bus's
        message limit (its status and error still reach every gateway)."""
        assert self.store is not None
        try:
            await self.store.save(record)
            return
        except Exception as exc:
            if record.result is None:
                log.warning("request %s: storing its record failed: %s", state.request_id, exc)
                return
            log.info("request %s: its images are too large for its record (%s); stored without", state.request_id, exc)
        dropped = {**(record.result or {}), "data": [], "images_dropped": True}
        try:
            await self.store.save(record.model_copy(update={"result": dropped}))
        except Exception as exc:  # the client has its answer; only other gateways miss the record
            log.warning("request %s: storing its record failed: %s", state.request_id, exc)

    async def adopt(self, dead: str, keys: list[str]) -> list[tuple[RequestState, AnswerSpec]]:
        """Take over the running requests `keys` of the dead gateway `dead`: rebuild each from
        its record, replay the results its steps sent to `dead` (the results stream keeps them;
        their tensors stay on the replicas that made them), and return them to be driven on
        (`execute(..., adopted=True)`). Steps `dead` had published and nobody finished are
        published again with the same message id: JetStream drops them as duplicates within
        its window, and their results, sent to `dead`, reach this gateway through the replay."""
        assert self.store is not None and self.leases is not None
        adopted: list[tuple[RequestState, AnswerSpec]] = []
        for key in keys:
            record = await self.store.load(key)
            if record is None or not record.running or record.run_id in self.runs:
                await self.leases.drop(key)
                continue
            state = state_of(record)
            self._remember(state)
            self.runs[state.run_id] = state
            self.answers[state.run_id] = record.answer
            self._publish_events(state)
            state.log.emit({"type": "adopted", "gateway": self.gateway_id, "from": dead})
            adopted.append((state, record.answer))
            await self.store.save(record.model_copy(update={"gateway": self.gateway_id}))
        if adopted and dead not in self._followed:  # (its own id, restarted: a second, replaying subscription)
            self._followed.add(dead)
            since = min(s.created for s, _ in adopted) - 1.0
            sub = await self.bus.subscribe_results(dead, self._on_result, since=since)
            await self.bus.subscribe_progress(dead, self._on_progress)
            await _caught_up(sub)
        return adopted

    def _on_cancel(self, run_id: str) -> None:
        state = self.runs.get(run_id)
        if state is not None and state.running:
            self._fail(state, ErrorInfo(code="cancelled", message="cancelled by the client (DELETE)"))

    async def let_go_of_taken(self) -> None:
        """This gateway stalled past its heartbeat's TTL and was taken for dead: stop driving
        the requests whose leases another gateway took (their waiters follow the records)."""
        assert self.leases is not None
        for state in list(self.runs.values()):
            if not await self.leases.mine(record_key(state.owner.key_id, state.request_id)):
                self._let_go(state)

    def hand_over(self) -> list[RequestState]:
        """Stop driving every running request (this gateway drains): each waiter is woken to
        follow its record, which the gateway that adopts it will finish."""
        handed = list(self.runs.values())
        for state in handed:
            self._let_go(state)
        return handed

    def _let_go(self, state: RequestState) -> None:
        state.handed_over = True
        state.log.sink = None
        self.runs.pop(state.run_id, None)
        if not state.finished.done():
            state.finished.set_result(None)

    def get(self, request_id: str, owner: Owner = NO_OWNER) -> RequestState | None:
        """`owner`'s request `request_id` (None for an unknown id or another key's request)."""
        return self.requests.get((owner.key_id, request_id))

    def waiting_steps(self, priority: int = 0) -> Counter[tuple[str, str]]:
        """(kind, model) -> steps this gateway's running requests of `priority` or higher will
        still publish: their nodes not started yet (the overload rule counts them as queued)."""
        bands = subjects.bands_at_or_above(priority)
        waiting: Counter[tuple[str, str]] = Counter()
        for state in self.runs.values():
            if subjects.band_of(state.priority) in bands:
                waiting.update((str(n.kind), n.model) for n in state.workflow.nodes if n.id not in state.nodes.started)
        return waiting

    def running_for(self, owner: Owner) -> int:
        """Requests of `owner` running now (its in-flight quota counts these)."""
        return sum(1 for s in self.runs.values() if s.owner.key_id == owner.key_id)

    def create(
        self,
        request_id: str,
        workflow: WorkflowSpec,
        params: dict[str, StepParams],
        timeout_s: float | None = None,
        owner: Owner = NO_OWNER,
        priority: int = 0,
    ) -> RequestState:
        """Register a request (so it can be followed and cancelled) before it runs; its deadline
        is `timeout_s` from now (default: the server's request timeout). `params`: each node's
        typed step params (`shared.workflows.step_params`), by node id; `owner`: the API key
        that asked (only it can follow or cancel the request). `priority` (0-9): every step of
        the request carries it, re-runs included, and queues in its band."""
        missing = [n.id for n in workflow.nodes if n.id not in params]
        if missing:
            raise ValueError(f"workflow {workflow.name!r}: no step params for nodes {missing}")
        earlier = self.get(request_id, owner)
        if earlier is not None and earlier.running:
            raise RequestFailed(ErrorInfo(code="duplicate_request", message=f"request {request_id} is running"))
        state = RequestState(
            request_id=request_id,
            workflow=workflow,
            params=params,
            deadline=time.time() + (timeout_s or self.settings.request_timeout_s),
            owner=owner,
            priority=priority,
            timeout_s=timeout_s,
        )
        self._remember(state)
        self.runs[state.run_id] = state
        state.log.emit({"type": "queued", "workflow": workflow.name})
        return state

    async def execute(
        self, state: RequestState, tensors: dict[str, RawTensor] | None = None, adopted: bool = False
    ) -> RawTensor:
        """Drive a created request to its output tensor, or raise RequestFailed / TimeoutError
        (HandedOver: another gateway drives it now).

        `tensors` are what the request itself carries (a control image): served from this
        gateway's tensor plane to the nodes that read `request.<name>`. An adopted request's
        carried tensors were on the dead gateway: the nodes that read them fail (input lost)."""
        workflow = state.workflow
        carried = tensors or {}
        if not adopted:
            state.nodes.outputs[REQUEST] = {
                name: self.plane.put(raw, owner=state.run_id) for name, raw in carried.items()
            }
        state.trace = tracing.begin(
            f"generate {workflow.name}",
            {"lego.workflow": workflow.name, "lego.request_id": state.request_id, "lego.run_id": state.run_id},
        )
        metrics.request_started(workflow.name)
        try:
            return await self._run_to_output(state)
        except TimeoutError:
            if state.handed_over:
                raise HandedOver() from None
            self._fail(state, self._deadline_error(state))
            raise
        except asyncio.CancelledError:  # the client went away: free the mesh's work for it
            self._fail(state, ErrorInfo(code="cancelled", message="the client disconnected"))
            await self.bus.publish_cancel(state.run_id)
            raise
        finally:
            await self._close(state)

    async def _run_to_output(self, state: RequestState) -> RawTensor:
        """Publish the request's steps and wait, within its deadline, for its output tensor."""
        out_node, output = split_ref(state.workflow.output)
        await self._advance(state)
        while True:
            await asyncio.wait_for(asyncio.shield(state.finished), timeout=max(0.0, state.deadline - time.time()))
            if state.handed_over:
                raise HandedOver()
            if state.error is not None:
                raise RequestFailed(state.error)
            try:
                return await self.plane.get(state.nodes.outputs[out_node][output])
            except (KeyError, TensorUnavailable) as exc:
                # The replica that decoded the images died before we pulled them: decode again.
                if not self._replan(state, {out_node}):
                    error = ErrorInfo(code="output_unavailable", message=str(exc), retryable=True)
                    state.move_to(RunStatus.RUNNING)  # reopened only to record that its images are gone
                    self._fail(state, error)
                    raise RequestFailed(error) from exc
                await self._advance(state)

    async def _close(self, state: RequestState) -> None:
        """Whatever the outcome: end its span, count it, and free what the mesh holds for it
        (not for one handed over: the gateway that drives it now does that)."""
        if state.handed_over:
            state.trace.close({"lego.status": "handed_over"})
            for seq in state.nodes.step_seqs:
                self._step_seqs.pop(seq, None)
            return
        status = RunStatus.FAILED if state.running else state.status
        state.trace.close({"lego.status": status.value}, error=state.error.code if state.error else None)
        metrics.request_finished(state.workflow.name, status.value, time.time() - state.created, state.priority)
        if state.owner.name:
            metrics.key_request_finished(state.owner.name, status.value, sum(state.nodes.compute_s.values()))
        for seq in state.nodes.step_seqs:
            self._step_seqs.pop(seq, None)
        self.runs.pop(state.run_id, None)
        self.plane.release(state.run_id)
        await self.bus.publish_release(state.run_id)

    def _deadline_error(self, state: RequestState) -> ErrorInfo:
        """Whose deadline passed, and where the request was. A deadline the client set is the
        client's to widen; the server's own timeout passing hints at a service missing."""
        if state.timeout_s is not None:
            message = (
                f"the request's deadline (timeout_s={state.timeout_s:g}) passed before it finished "
                f"({state.progress()}); allow more time with timeout_s"
            )
        else:
            message = (
                f"the request did not finish in time (the server's timeout, {self.settings.request_timeout_s:g}s; "
                f"{state.progress()}); is every service running?"
            )
        return ErrorInfo(code="deadline_exceeded", message=message, retryable=True)

    def _remember(self, state: RequestState) -> None:
        handle = (state.owner.key_id, state.request_id)
        self.requests[handle] = state
        self.requests.move_to_end(handle)
        while len(self.requests) > KEEP_FINISHED:
            oldest_id, oldest = next(iter(self.requests.items()))
            if oldest.running:
                break
            del self.requests[oldest_id]

    async def _advance(self, state: RequestState) -> None:
        """Publish every node whose inputs are ready, concurrently (parallel branches start together)."""
        steps = []
        for node in ready_nodes(state.workflow, state.nodes.done, state.nodes.started):
            try:
                inputs = wire_inputs(node, state.nodes.outputs)
            except WorkflowError as exc:
                self._fail(state, ErrorInfo(code="workflow_error", message=str(exc)))
                return
            step = StepRequest(
                request_id=state.run_id,
                node_id=node.id,
                kind=node.kind,
                model_id=node.model,
                params=state.params[node.id],
                inputs=inputs,
                reply_to=subjects.result_subject(self.gateway_id),
                progress_to=subjects.progress_subject(self.gateway_id),
                deadline=state.deadline,
                attempt=state.nodes.attempt(node.id),
                priority=state.priority,
            )
            state.nodes.started.add(node.id)
            state.nodes.published_at[node.id] = time.perf_counter()
            state.log.emit({"type": "node", "node": node.id, "state": "running", "attempt": step.attempt})
            steps.append(step)
        try:
            seqs = await asyncio.gather(*(self.bus.publish_step(step, state.trace.headers) for step in steps))
        except Exception as exc:  # NATS away longer than the bus retries a publish: an answer, not a hang
            message = f"the bus did not take the request's steps: {type(exc).__name__}: {exc}"
            self._fail(state, ErrorInfo(code="bus_unavailable", message=message, retryable=True))
            return
        for step, seq in zip(steps, seqs, strict=True):
            self._step_seqs[seq] = (state.run_id, step.node_id)
            state.nodes.step_seqs.append(seq)

    async def _on_result(self, result: StepResult) -> None:
        state = self.runs.get(result.request_id)
        if state is None or not state.running or result.node_id in state.nodes.done:
            return  # unknown, finished, or a duplicate: results are idempotent
        nodes = state.nodes
        if result.attempt != nodes.attempt(result.node_id):
            return  # an answer to an attempt that was re-planned since
        nodes.replicas[result.node_id] = result.replica_id
        nodes.compute_s[result.node_id] = round(result.compute_s, 4)
        published = nodes.published_at.get(result.node_id)  # none: replayed for an adopted request
        nodes.wall_s[result.node_id] = round(time.perf_counter() - published, 4) if published else 0.0
        if not result.ok:
            error = result.error or ErrorInfo(code="step_failed", message="a step failed")
            if error.code == "input_lost" and self._replan_lost_inputs(state, result.node_id, error.lost_inputs):
                await self._advance(state)
                return
            self._fail(state, error)
            return
        nodes.done.add(result.node_id)
        nodes.outputs[result.node_id] = result.outputs
        state.log.emit(
            {
                "type": "node",
                "node": result.node_id,
                "state": "done",
                "replica": result.replica_id,
                "compute_s": nodes.compute_s[result.node_id],
            }
        )
        out_node, _ = split_ref(state.workflow.output)
        if out_node in nodes.done:
            state.move_to(RunStatus.SUCCEEDED)
            return
        await self._advance(state)

    def _replan_lost_inputs(self, state: RequestState, node_id: str, lost: list[str]) -> bool:
        node = state.workflow.node(node_id)
        producers = {split_ref(node.inputs[name])[0] for name in lost if name in node.inputs} - {REQUEST}
        return bool(producers) and self._replan(state, producers | {node_id})

    def _replan(self, state: RequestState, nodes: set[str]) -> bool:
        """Run `nodes` again under a new attempt number (their outputs were lost with a replica)."""
        if state.nodes.replans >= MAX_REPLANS:
            return False
        if state.status is RunStatus.SUCCEEDED:  # its images were lost before we pulled them: reopen it
            state.move_to(RunStatus.RUNNING)
        state.nodes.rerun(nodes)
        log.info("request %s: re-running %s, whose outputs were lost", state.request_id, sorted(nodes))
        return True

    async def _on_exhausted(self, seq: int, deliveries: int) -> None:
        run_id, node_id = self._step_seqs.pop(seq, ("", ""))
        state = self.runs.get(run_id)
        if state is not None and node_id not in state.nodes.done:
            message = f"step {node_id!r} was delivered {deliveries} times and never finished (its replicas died)"
            self._fail(state, ErrorInfo(code="step_exhausted", message=message, retryable=True))

    async def _on_progress(self, progress: StepProgress) -> None:
        state = self.runs.get(progress.request_id)
        if state is not None and state.running and progress.step != state.denoising.step:
            state.denoising.step, state.denoising.total = progress.step, progress.total
            state.nodes.replicas[progress.node_id] = progress.replica_id
            state.log.emit(
                {"type": "progress", "node": progress.node_id, "step": progress.step, "total": progress.total}
            )

    async def cancel(self, request_id: str, owner: Owner = NO_OWNER) -> RequestState | None:
        """Stop a running request: the denoiser leaves its loop at the next step, steps not yet
        started are dropped by the services, and its tensors are freed when `execute` returns."""
        state = self.get(request_id, owner)
        if state is None or not state.running:
            return state
        self._fail(state, ErrorInfo(code="cancelled", message="cancelled by the client (DELETE)"))
        await self.bus.publish_cancel(state.run_id)
        return state

    def queue_position(self, state: RequestState) -> int:
        """Requests ahead of this one for its base model, as this gateway sees them (0: it is
        being served, or has passed the denoiser). Ahead: those of a higher priority band, those
        of its band that came earlier, and lower-band ones the denoiser already serves."""
        denoise = _denoise_node(state.workflow)
        if denoise is None or not state.running or denoise.id in state.nodes.done or state.denoising.step > 0:
            return 0
        ahead = 0
        for other in self.runs.values():
            if other is state or not other.running or not _served_before(other, state):
                continue
            other_denoise = _denoise_node(other.workflow)
            if other_denoise is None or other_denoise.id in other.nodes.done:
                continue
            if other_denoise.model == denoise.model:
                ahead += 1
        return ahead

    def _fail(self, state: RequestState, error: ErrorInfo) -> None:
        if not state.running:
            return
        state.error = error
        state.move_to(RunStatus.CANCELLED if error.code == "cancelled" else RunStatus.FAILED)
        state.log.emit({"type": "error", "code": error.code, "message": error.message})
        log.info("request %s failed: %s %s", state.request_id, error.code, error.message)


def _served_before(other: RequestState, state: RequestState) -> bool:
    """Whether `other` gets the denoiser before `state`: by priority band, then by arrival
    (lower-band requests only when already being denoised)."""
    mine, theirs = subjects.band_rank(state.priority), subjects.band_rank(other.priority)
    if theirs != mine:
        return theirs < mine or other.denoising.step > 0
    return other.created <= state.created


def _denoise_node(workflow: WorkflowSpec) -> NodeSpec | None:
    """The workflow's denoising node (None for a workflow without one)."""
    try:
        return workflow.node_of_kind(StepKind.DENOISE)
    except KeyError:
        return None


async def _caught_up(sub: object, timeout_s: float = CATCH_UP_S) -> None:
    """Until an ordered consumer that replays stored messages has delivered and handled them
    all (or `timeout_s`): an adopter learns what was done before it publishes anything."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout_s
    while loop.time() < give_up:
        try:
            info = await sub.consumer_info()  # type: ignore[attr-defined]
        except Exception:
            info = None
        if info is not None and not info.num_pending and not sub.pending_msgs:  # type: ignore[attr-defined]
            return
        await asyncio.sleep(0.05)
