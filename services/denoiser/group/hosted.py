"""Whole loops a follower runs itself: a request of degree 1 on a follower's device.

Why: a request on one device needs nothing from the others, yet driven step by step from the
leader, every step of it waited for a round trip (the call out, the noise prediction back,
and the leader's turn on a core between them). On the 2-core dev box that hop cost a tiny
model's step 1-2 ms of 8, and the leader's share of the cores besides: a group of 2 ran
0.77-0.90 of 2 independent replicas' throughput. So the leader hands a follower the request's
inputs once (`host_message`), the follower builds the same loop (`denoise.denoise_loop`) and
runs it in its own step-level batching engine, alongside any parts of split calls it is sent,
and answers with progress after each step and the final latents at the end.

What stays with the leader: the request's degree and place (the engine), its progress events
and cancellation (`HostedRequest` hears each step, reports it, and tells the follower to stop
when the request is cancelled), and ControlNet requests (their residuals come over the bus,
which only the leader holds: those run step by step).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from services.denoiser.loop import DenoiseCancelled, DenoiseInputs, TransformerCall

log = logging.getLogger("lego.denoiser.group")

LoraSet = tuple[tuple[str, float], ...]
Send = Callable[[dict[str, Any]], None]

_SCALARS = ("height", "width", "num_inference_steps", "guidance_scale", "seed", "n", "negative_prompt")


def can_host(inputs: DenoiseInputs | None) -> bool:
    """Whether a follower can run this request's whole loop: not with a ControlNet (its
    residuals come over the bus, step by step, through the leader)."""
    return inputs is not None and inputs.control is None


def host_message(number: int, inputs: DenoiseInputs, loras: LoraSet, max_batch: int) -> dict[str, Any]:
    """The command that hands a follower request `number`'s loop: its tensors and parameters."""
    tensors = {name: t for name, t in inputs.tensors.items() if isinstance(t, torch.Tensor)}
    return {
        "op": "host",
        "id": number,
        "tensors": tensors,
        "params": {name: getattr(inputs, name) for name in _SCALARS},
        "loras": [[name, scale] for name, scale in loras],
        "max_batch": max_batch,
        # a step's progress goes back only when someone listens (or may cancel): no wake-up per step otherwise
        "progress": inputs.on_step is not None or inputs.should_stop is not None,
    }


@dataclass(eq=False)
class HostedRequest:
    """The leader's record of a loop a follower runs: its future, the request's own progress and
    stop callbacks, and `cancel()` to tell the follower to stop it. Of every call the follower
    ran since its last answer, `on_batch(n)` hears the requests of each (metrics)."""

    number: int
    inputs: DenoiseInputs
    cancel: Callable[[], None]
    on_batch: Callable[[int], None] | None = None
    future: Future[torch.Tensor] = field(default_factory=Future)
    cancel_sent: bool = field(default=False, init=False)

    def heard(self, message: dict[str, Any]) -> None:
        """A message of the follower's about this request: a step done, or the loop's end."""
        if message["op"] == "progress":
            if self.inputs.on_step is not None:
                self.inputs.on_step(int(message["done"]), int(message["total"]))
            if not self.cancel_sent and self.inputs.should_stop is not None and self.inputs.should_stop():
                self.cancel_sent = True
                self.cancel()
            return
        if self.on_batch is not None:
            for size, calls in message.get("batches", {}).items():
                for _ in range(int(calls)):
                    self.on_batch(int(size))
        error = message.get("error")
        if error is None:
            self.future.set_result(message["output"])
        elif message.get("kind") == "cancelled":
            self.future.set_exception(DenoiseCancelled(error))
        elif message.get("kind") == "input":
            self.future.set_exception(ValueError(error))
        else:
            self.future.set_exception(RuntimeError(f"device of the group: {error}"))

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class HostedLoops:
    """A follower's side: the loops it runs whole, batched step by step as a single-device
    replica batches them, each call run on its device (`Device.run`, which also runs the parts
    of split calls the leader sends; it takes them in turn). `run_part` answers a call's output."""

    def __init__(self, bundle: Any, run_part: Callable[[TransformerCall, LoraSet], torch.Tensor], send: Send) -> None:
        self._bundle = bundle
        self._run_part = run_part
        self._send = send
        self._engine: Any = None  # BatchEngine, built at the first loop (its size comes with it)
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()
        self._batches: Counter[int] = Counter()  # requests per call, since the last answer

    def start(self, message: dict[str, Any]) -> None:
        """Start request `message["id"]`'s loop; its answer goes back when it ends."""
        from services.denoiser.denoise import denoise_loop

        number = int(message["id"])
        inputs = DenoiseInputs(
            tensors=message["tensors"],
            **message["params"],
            on_step=(
                (lambda done, total: self._send({"op": "progress", "id": number, "done": done, "total": total}))
                if message["progress"]
                else None
            ),
            should_stop=lambda: number in self._cancelled,
        )
        loras = [(str(name), float(scale)) for name, scale in message["loras"]]
        try:
            loop = denoise_loop(self._bundle, inputs)
            future = self._engine_for(int(message["max_batch"])).submit(loop, loras)
        except Exception as exc:
            self._answer(number, None, exc)
            return
        future.add_done_callback(lambda f: self._answer(number, None if f.exception() else f.result(), f.exception()))

    def cancel(self, number: int) -> None:
        with self._lock:
            self._cancelled.add(number)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()

    def _engine_for(self, max_batch: int) -> Any:
        from services.denoiser.batching import BatchEngine

        if self._engine is None:
            self._engine = BatchEngine(
                None, max_batch, activate_loras=lambda _chosen: None, name="hosted-loops", execute=self._execute
            )
        return self._engine

    def _execute(self, call: TransformerCall, loras: LoraSet, requests: int) -> torch.Tensor:
        out = self._run_part(call, loras)
        with self._lock:
            self._batches[requests] += 1
        return out

    def _answer(self, number: int, output: torch.Tensor | None, error: BaseException | None) -> None:
        with self._lock:
            self._cancelled.discard(number)
            batches, self._batches = self._batches, Counter()
        reply: dict[str, Any] = {
            "op": "hosted",
            "id": number,
            "batches": {str(size): calls for size, calls in batches.items()},
        }
        if error is None:
            reply["output"] = output
        else:
            kind = _kind(error)
            if kind == "error":
                log.warning("group: a hosted loop failed: %s", error)
            reply |= {"error": str(error), "kind": kind}
        self._send(reply)


def _kind(error: BaseException) -> str:
    """How the leader re-raises a hosted loop's failure: as the runner maps a local loop's."""
    if isinstance(error, DenoiseCancelled):
        return "cancelled"
    return "input" if isinstance(error, ValueError) else "error"
