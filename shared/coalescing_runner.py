"""The base of a runner whose steps are one-shot model calls that may share a call under load.

Why a base: a text encoder, a VAE and a ControlNet differ in how a step becomes an item and
how items run together (`run_many`, `batch_key`), not in how items reach the model. What is
the same for all of them lives here once: with a max batch > 1 the items go through a
`Coalescer` (queued items with one key run as one call) and that many steps are taken in
hand at once; with a max batch of 1 there is no coalescer and an item runs on the caller's
thread. Either way a lone item runs as `run_many([item])`, the path services keep bit-exact.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from shared import metrics
from shared.coalesce import Coalescer, max_batch
from shared.messages import StepKind
from shared.settings import Settings

T = TypeVar("T")
R = TypeVar("R")
Runner = TypeVar("Runner", bound="CoalescingRunner[Any, Any]")


@dataclass
class CoalescingRunner(ABC, Generic[T, R]):
    """One loaded model (`bundle`) whose items run through `run_many`, coalesced or alone."""

    model_id: str
    bundle: Any
    # Steps the service takes in hand at once: the max batch once coalescing, else 1.
    concurrency: int = field(default=1, init=False)
    _coalescer: Coalescer[T, R] | None = field(default=None, init=False, repr=False)

    @abstractmethod
    def run_many(self, items: list[T]) -> list[R]:
        """One result per item, in order; items share a `batch_key`. Alone: as the pipeline runs it."""

    @abstractmethod
    def batch_key(self, item: T) -> Hashable:
        """Items with equal keys may run in one call (same options, shapes that stack)."""

    @classmethod
    def loader(
        cls: type[Runner],
        load_bundle: Callable[[str, Settings], Any],
        max_batch_setting: Callable[[Settings], int],
        gpu_default: int,
        kind: StepKind,
    ) -> Callable[[str, Settings], Runner]:
        """A service's `load(model_id, settings)`: the model from `load_bundle`, coalescing up
        to `max_batch_setting(settings)` items a call (0: `gpu_default` on a GPU, 1 on the CPU)."""

        def load(model_id: str, settings: Settings) -> Runner:
            runner = cls(model_id=model_id, bundle=load_bundle(model_id, settings))
            runner.start_coalescing(max_batch_setting(settings), settings.device, gpu_default, kind)
            return runner

        return load

    def start_coalescing(self, configured: int, device: str, gpu_default: int, kind: StepKind) -> None:
        """Coalesce up to `max_batch(configured, device, gpu_default)` items a call (nothing to
        start when that is 1); each call's size is observed as `kind` steps of this model."""
        if self._coalescer is not None:
            raise RuntimeError(f"{self.model_id} is coalescing already")
        batch = max_batch(configured, device, gpu_default=gpu_default)
        if batch <= 1:
            return
        self._coalescer = Coalescer(
            self.run_many,
            key=self.batch_key,
            max_batch=batch,
            name=f"coalesce-{self.model_id}",
            on_batch=metrics.StepMetrics(str(kind), self.model_id).batch.observe,
        )
        self.concurrency = batch

    def run_one(self, item: T) -> R:
        """One step's result: through the coalescer when there is one, else alone right here."""
        if self._coalescer is not None:
            return self._coalescer.submit(item).result()
        return self.run_many([item])[0]

    def close(self) -> None:
        """Stop the coalescer's thread (steps still queued fail with "shutting down")."""
        if self._coalescer is not None:
            self._coalescer.close()
