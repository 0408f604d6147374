"""Step-level batching: requests join and leave the running batch between denoising steps.

Why: on a GPU one transformer call over several requests costs little more than a call over
one, so a replica that runs each request's loop alone wastes most of its device while
requests queue. Here every request's loop (`loop.denoise_loop`, a generator) hands over its
next `TransformerCall`; one engine thread per loaded base model takes the oldest request,
gathers the other waiting requests whose calls fit with it (same shapes bar
the batch dimension, same position ids, same LoRA set: `compatible`), runs them as one call,
and hands each request its slice of the output. A request that arrives joins at the next
step; one that finishes (or is cancelled) leaves without holding up the rest.

A request alone runs exactly as `loop.run_loop` runs it, call for call, so its latents are
the pipeline's bit for bit. Batched, results differ from solo ones by float rounding (a
matrix product over more rows may sum in another order): about 1e-6 per call.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from services.denoiser.loop import DenoiseLoop, TransformerCall, call_transformer

log = logging.getLogger(__name__)

LoraSet = tuple[tuple[str, float], ...]


@dataclass(eq=False)
class _Job:
    loop: DenoiseLoop
    loras: LoraSet
    context: contextvars.Context
    future: Future[torch.Tensor] = field(default_factory=Future)
    call: TransformerCall | None = None
    arrived: float = field(default_factory=time.monotonic)  # the oldest request leads (first come, first served)


def _fits(a: object, b: object) -> bool:
    """Two batched arguments can be concatenated: both None, or tensors (or lists or dicts of
    tensors) alike in everything but the first dimension."""
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, dict) or isinstance(b, dict):  # SDXL's added_cond_kwargs
        return (
            isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(_fits(a[k], b[k]) for k in a)
        )
    if isinstance(a, list | tuple) or isinstance(b, list | tuple):
        return (
            isinstance(a, list | tuple)
            and isinstance(b, list | tuple)
            and len(a) == len(b)
            and all(_fits(x, y) for x, y in zip(a, b, strict=True))
        )
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape[1:] == b.shape[1:] and a.dtype == b.dtype and a.device == b.device and a.ndim > 0
    return False


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and bool(torch.equal(a, b))
        )
    return bool(a == b)


def compatible(a: TransformerCall, b: TransformerCall) -> bool:
    """Whether two requests' calls can run as one batched call."""
    if a.cache_context != b.cache_context or a.batched.keys() != b.batched.keys() or a.shared.keys() != b.shared.keys():
        return False
    return all(_fits(a.batched[k], b.batched[k]) for k in a.batched) and all(
        _same(a.shared[k], b.shared[k]) for k in a.shared
    )


def _concat(values: list[Any]) -> Any:
    if values[0] is None:
        return None
    if isinstance(values[0], dict):
        return {k: _concat([v[k] for v in values]) for k in values[0]}
    if isinstance(values[0], list | tuple):
        return [torch.cat([v[i] for v in values]) for i in range(len(values[0]))]
    return torch.cat(values)


def merge(calls: list[TransformerCall]) -> TransformerCall:
    """One call over several requests' calls (`compatible` with each other), rows in order."""
    if len(calls) == 1:
        return calls[0]
    batched = {k: _concat([c.batched[k] for c in calls]) for k in calls[0].batched}
    return TransformerCall(batched=batched, shared=calls[0].shared, cache_context=calls[0].cache_context)


class BatchEngine:
    """Runs the denoising loops of one base model, several requests per transformer call.

    `submit` is called from any thread and returns a Future of the request's final latents;
    all model work happens on the engine's own thread. `activate_loras(loras)` switches the
    base model's LoRA set (empty: none); requests with different sets never share a call.
    `on_batch(n)` is told the number of requests of every call (metrics).
    `execute(call, loras, requests)`, when given, runs each merged call instead of the local
    transformer (a parallel group's devices, `group/engine.py`; it switches LoRAs itself).
    """

    def __init__(
        self,
        transformer: torch.nn.Module | None,
        max_batch: int,
        activate_loras: Callable[[list[tuple[str, float]]], None],
        on_batch: Callable[[int], None] | None = None,
        name: str = "denoise-batcher",
        execute: Callable[[TransformerCall, LoraSet, int], torch.Tensor] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if transformer is None and execute is None:
            raise ValueError("a BatchEngine needs a transformer or an execute function")
        self.transformer = transformer
        self._execute = execute
        self.max_batch = max_batch
        self._activate_loras = activate_loras
        self._on_batch = on_batch
        self._loras_on: LoraSet | None = None  # unknown at start: the first call sets it
        self._incoming: list[_Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self.batch_sizes: Counter[int] = Counter()  # requests per transformer call, over the engine's life
        self._helpers = ThreadPoolExecutor(max_workers=max_batch, thread_name_prefix=f"{name}-loops")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(
        self, loop: DenoiseLoop, loras: list[tuple[str, float]] | None = None, facts: object = None
    ) -> Future[torch.Tensor]:
        """Queue a request's loop; it joins the running batch at the next step. The caller's
        context (its trace span) is the one the loop's own calls run in. (`facts`: what a
        parallel group reads to choose a degree; one device has none to choose.)"""
        job = _Job(loop=loop, loras=tuple(loras or ()), context=contextvars.copy_context())
        with self._cond:
            if self._closed:
                raise RuntimeError("the batching engine is closed")
            self._incoming.append(job)
            self._cond.notify()
        return job.future

    def close(self) -> None:
        """Stop after the call in hand; requests still running fail (their steps are retried)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=60)
        self._helpers.shutdown(wait=False, cancel_futures=True)

    # -- the engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        active: list[_Job] = []
        while True:
            with self._cond:
                while not self._incoming and not active and not self._closed:
                    self._cond.wait()
                if self._closed:
                    for job in active + self._incoming:
                        job.future.set_exception(RuntimeError("the denoiser is shutting down"))
                    return
                arrived, self._incoming = self._incoming, []
            started = self._advance_all([(job, None) for job in arrived])
            active += [job for job, alive in zip(arrived, started, strict=True) if alive]
            if active:
                group = self._group(active)
                self._step(group)
                active = [job for job in active if not job.future.done()]

    def _advance(self, job: _Job, output: torch.Tensor | None) -> bool:
        """Run `job`'s loop up to its next transformer call; False once it has finished."""
        try:
            with torch.inference_mode():
                if output is None:
                    job.call = job.context.run(next, job.loop)
                else:
                    job.call = job.context.run(job.loop.send, output)
        except StopIteration as done:
            job.future.set_result(done.value)
            return False
        except Exception as exc:  # cancelled, bad input, a ControlNet step that failed: this job only
            job.future.set_exception(exc)
            return False
        return True

    def _group(self, active: list[_Job]) -> list[_Job]:
        """The oldest request and, up to max_batch, the next oldest whose calls fit with it.

        First come, first served across groups that cannot share a call (other sizes or LoRA
        sets wait for the oldest to finish rather than slowing every request by taking turns);
        within a group, anyone who fits rides along."""
        waiting = sorted(active, key=lambda j: j.arrived)
        leader = waiting[0]
        assert leader.call is not None
        group = [leader]
        for job in waiting[1:]:
            if len(group) >= self.max_batch:
                break
            if job.loras == leader.loras and job.call is not None and compatible(leader.call, job.call):
                group.append(job)
        return group

    def _step(self, group: list[_Job]) -> None:
        calls = [job.call for job in group if job.call is not None]
        try:
            output = group[0].context.run(self._call, merge(calls), group[0].loras, len(group))
        except Exception as exc:
            log.warning("a batched denoising call of %d request(s) failed: %s", len(group), exc)
            for job in group:
                job.future.set_exception(exc)
            return
        self.batch_sizes[len(group)] += 1
        if self._on_batch is not None:
            self._on_batch(len(group))
        parts = output.split([call.rows() for call in calls]) if len(group) > 1 else [output]
        self._advance_all(list(zip(group, parts, strict=True)))

    def _call(self, call: TransformerCall, loras: LoraSet, requests: int) -> torch.Tensor:
        """One merged call: on the group's devices, or here with the call's LoRAs switched on."""
        if self._execute is not None:
            return self._execute(call, loras, requests)
        if loras != self._loras_on:
            self._loras_on = None  # unknown until the switch succeeds
            self._activate_loras(list(loras))
            self._loras_on = loras
        with torch.inference_mode():
            return call_transformer(self.transformer, call)

    def _advance_all(self, work: list[tuple[_Job, torch.Tensor | None]]) -> list[bool]:
        """Advance several requests' loops to their next call side by side: a ControlNet request's
        loop waits on the adapters service for its residuals on the way, and those waits (and
        the scheduler steps) then overlap instead of adding up. Each loop runs on one thread."""
        if len(work) <= 1:
            return [self._advance(job, output) for job, output in work]
        return list(self._helpers.map(lambda item: self._advance(*item), work))
