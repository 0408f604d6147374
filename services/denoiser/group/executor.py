"""The leader's side of a group: its followers' processes, and one lane per device.

A lane runs its device's commands one after another: device 0's on a thread of this process
when the leader runs it (GPUs), a follower's in the follower, which reads them from its channel
in the order they were written (on a CPU every device is a follower: `runtime` says why).
`run(first, call, how, loras)` hands each device of [first, first + degree) its part under one
lock, so every device sees the parts of multi-device calls in the same order, and the
collectives inside them always meet. `host(device, inputs, ...)` hands a follower a request's
whole loop instead (a request of degree 1: `hosted.py` says why).

If a follower dies, its lane's channel breaks and the leader process exits: the replica is
gone as a whole, and the steps it held are redelivered to another replica (nothing is lost,
as when a single-device replica dies).
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from services.denoiser.group import wire
from services.denoiser.group.hosted import HostedRequest, host_message
from services.denoiser.group.runtime import RankState, join_group, leader_runs_a_device, part_message
from services.denoiser.group.split import Layout, Part, merge, split
from services.denoiser.loop import DenoiseInputs, TransformerCall
from shared.settings import Settings

log = logging.getLogger("lego.denoiser.group")

LoraSet = tuple[tuple[str, float], ...]
_Work = tuple[Part, LoraSet, Future]


class _Lane:
    """The leader's own device (GPUs): a FIFO of parts, run on its own thread by `execute(part, loras)`."""

    def __init__(self, rank: int, execute: Callable[[Part, LoraSet], torch.Tensor | None]) -> None:
        self.rank = rank
        self._execute = execute
        self._queue: queue.Queue[_Work | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"group-lane-{rank}", daemon=True)
        self._thread.start()

    def submit(self, part: Part, loras: LoraSet) -> Future:
        done: Future = Future()
        self._queue.put((part, loras, done))
        return done

    def result(self, done: Future) -> torch.Tensor | None:
        return done.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while (work := self._queue.get()) is not None:
            part, loras, done = work
            try:
                done.set_result(self._execute(part, loras))
            except Exception as exc:
                done.set_exception(exc)


class _RemoteLane:
    """A follower's device. Its parts are written to the follower's channel by the caller's own
    thread (under the executor's order lock, so every follower reads the parts of multi-device
    calls in one order); whole loops handed to it (`host`) go the same way. One reader thread
    takes everything the follower says: a part's answer (they come back in the order sent), a
    hosted loop's progress, or its end."""

    def __init__(self, index: int, channel: wire.Channel, device: torch.device) -> None:
        self.index = index
        self._channel = channel
        self._device = device
        self._waiting: collections.deque[Future] = collections.deque()  # sent, not yet answered, oldest first
        self._hosted: dict[int, HostedRequest] = {}
        self._lock = threading.Lock()
        self._broken: BaseException | None = None
        self._reader = threading.Thread(target=self._read, name=f"group-lane-{index}", daemon=True)
        self._reader.start()

    def submit(self, part: Part, loras: LoraSet) -> Future:
        done: Future = Future()
        with self._lock:
            if self._broken is not None:
                done.set_exception(self._broken)
                return done
            self._waiting.append(done)
        self._send(part_message(part, loras))
        return done

    def result(self, done: Future) -> torch.Tensor | None:
        return done.result()

    def host(self, request: HostedRequest, message: dict[str, Any]) -> None:
        """Hand the follower a whole loop (`hosted`); `request` hears its progress and its end."""
        with self._lock:
            if self._broken is not None:
                request.fail(self._broken)
                return
            self._hosted[request.number] = request
        self._send(message)

    def cancel(self, number: int) -> None:
        self._send({"op": "cancel", "id": number})

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self._channel.send(message)
        except OSError as exc:
            self._fail(ConnectionError(f"device {self.index} of the group is gone: {exc}"))

    def _read(self) -> None:
        while True:
            try:
                reply = self._channel.recv(self._device)
            except (OSError, ValueError) as exc:  # the follower is gone (its exit stops the replica)
                self._fail(ConnectionError(f"device {self.index} of the group is gone: {exc}"))
                return
            op = reply.get("op")
            if op in ("progress", "hosted"):
                with self._lock:
                    number = int(reply["id"])
                    request = self._hosted.pop(number) if op == "hosted" else self._hosted.get(number)
                if request is not None:
                    request.heard(reply)
                continue
            with self._lock:
                answered = self._waiting.popleft() if self._waiting else None
            if answered is None:
                log.error("group device %d answered a part it was not sent (%s)", self.index, op)
            elif op == "error":
                answered.set_exception(RuntimeError(f"device {self.index} of the group: {reply.get('message')}"))
            else:
                out = reply.get("output")
                answered.set_result(out if isinstance(out, torch.Tensor) else None)

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._broken is None:
                self._broken = exc
            waiting, self._waiting = list(self._waiting), collections.deque()
            hosted, self._hosted = list(self._hosted.values()), {}
        for done in waiting:
            if not done.done():
                done.set_exception(exc)
        for request in hosted:
            request.fail(exc)

    def close(self) -> None:
        try:
            self._channel.send({"op": "stop"})
        except OSError as exc:  # the other end is already gone
            log.debug("group device %d: closing: %s", self.index, exc)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GroupExecutor:
    """Rank 0 of a group of `world` devices serving `model_id`. Starting it starts the
    followers, then loads the leader's own model (`load_bundle()`: the requests' loops need
    its scheduler and config, and on GPUs device 0 runs it) while they load theirs, and waits
    until all hold the same weights; `state.bundle` is the leader's model. `leader_computes`:
    whether device 0 runs in this process (default: on GPUs only, see `runtime`)."""

    def __init__(
        self,
        model_id: str,
        load_bundle: Callable[[], Any],
        settings: Settings,
        world: int,
        leader_computes: bool | None = None,
    ) -> None:
        if world not in (2, 4):
            raise ValueError(f"LEGO_DENOISE_GROUP_SIZE={world}: a group has 1, 2 or 4 devices")
        if leader_computes is None:
            leader_computes = leader_runs_a_device(settings.device)
        offset = 0 if leader_computes else 1
        self.world = world
        self.model_id = model_id
        self._order = threading.Lock()
        self._closed = False
        self._hosted = 0  # loops handed to followers so far (each one's number)
        init = f"tcp://127.0.0.1:{_free_port()}"
        env = {**os.environ, **settings.to_env()}
        command = [sys.executable, "-m", "services.denoiser.group.follower", "--world", str(world), "--init", init]
        command += ["--model", model_id, "--parent", str(os.getpid()), "--offset", str(offset)]
        self._channels: dict[int, wire.Channel] = {}
        self._followers = []
        for rank in range(1, world + offset):
            mine, theirs = socket.socketpair()
            fd = ["--channel-fd", str(theirs.fileno())]
            self._followers.append(
                subprocess.Popen([*command, "--rank", str(rank), *fd], env=env, pass_fds=[theirs.fileno()])
            )
            theirs.close()
            self._channels[rank] = wire.Channel(mine)
        started = time.monotonic()
        try:
            self.state: RankState = join_group(settings, model_id, 0, world, init, bundle=load_bundle(), offset=offset)
        except BaseException:
            self._kill_followers()
            raise
        self.by_tokens = self.state.worker.by_tokens
        self._lanes: list[_Lane | _RemoteLane] = [
            _Lane(0, self.state.worker.run)
            if device + offset == 0
            else _RemoteLane(device, self._channels[device + offset], self.state.device)
            for device in range(world)
        ]
        threading.Thread(target=self._watch_followers, name="group-watch", daemon=True).start()
        log.info(
            "group of %d devices formed for %s in %.1f s (sequence split: %s; the leader %s)",
            world,
            model_id,
            time.monotonic() - started,
            "yes" if self.by_tokens else "no",
            "runs device 0" if leader_computes else "coordinates only",
        )

    def run(self, first: int, call: TransformerCall, how: Layout, loras: LoraSet) -> torch.Tensor:
        """Run `call` over devices [first, first + how.degree), laid out as `how`; its output."""
        parts = split(call, how)
        with self._order:
            if self._closed:
                raise RuntimeError("the group is shutting down")
            futures = [self._lanes[first + i].submit(part, loras) for i, part in enumerate(parts)]
        return merge([self._lanes[first + i].result(f) for i, f in enumerate(futures)], how)

    def can_host(self, device: int) -> bool:
        """Whether `device` is a follower's, which can run a request's whole loop itself."""
        return isinstance(self._lanes[device], _RemoteLane)

    def host(
        self,
        device: int,
        inputs: DenoiseInputs,
        loras: LoraSet,
        max_batch: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> Future[torch.Tensor]:
        """Run a request's whole loop on follower `device` (`hosted`); a future of its latents."""
        lane = self._lanes[device]
        if not isinstance(lane, _RemoteLane):
            raise ValueError(f"device {device} runs in the leader: its requests run step by step")
        with self._order:
            if self._closed:
                raise RuntimeError("the group is shutting down")
            self._hosted += 1
            number = self._hosted
        request = HostedRequest(number, inputs, cancel=lambda: lane.cancel(number), on_batch=on_batch)
        lane.host(request, host_message(number, inputs, loras, max_batch))
        return request.future

    def _watch_followers(self) -> None:
        while not self._closed:
            for p in self._followers:
                if p.poll() is not None and not self._closed:
                    log.error(
                        "a follower of %s's group exited (code %s): the replica stops; its steps are redelivered",
                        self.model_id,
                        p.returncode,
                    )
                    os._exit(70)
            time.sleep(0.5)

    def close(self) -> None:
        """Tell the followers to stop, then make sure they have."""
        with self._order:
            self._closed = True
        for lane in self._lanes:
            lane.close()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        deadline = time.monotonic() + 20
        for p in self._followers:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
        self._kill_followers()

    def _kill_followers(self) -> None:
        for p in self._followers:
            if p.poll() is None:
                p.kill()
                p.wait()
        for channel in self._channels.values():
            channel.close()
