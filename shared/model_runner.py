"""What a model service supplies to the runtime (`shared.service`): a `ServiceSpec` naming its
models and how to load one, and `ModelRunner`s, each a plain function from input tensors to
output tensors. Kept apart from the runtime so that runners depend on this contract only."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from shared.messages import StepKind, StepRequest
from shared.remote_steps import RemoteSteps
from shared.settings import Settings
from shared.tensor_plane import TensorPlane

ProgressFn = Callable[[int, int], None]


@dataclass
class StepContext:
    """What a runner may use besides its inputs: progress reports and steps of other models."""

    progress: ProgressFn
    remote: RemoteSteps
    plane: TensorPlane
    should_stop: Callable[[], bool] = lambda: False  # true once the step's request is cancelled


class ModelRunner(Protocol):
    """One loaded model and the plain functions that run steps on it (one per step kind)."""

    kinds: tuple[StepKind | str, ...]  # a kind of its own, outside StepKind, is any subject token
    model_id: str

    def run(self, step: StepRequest, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        """Compute on torch tensors; raise `BadStepInput` for input no replica could serve."""
        ...

    def warm_up(self) -> None:
        """One small call at start: the first real request should not pay one-time kernel setup."""
        ...

    def status(self) -> dict[str, Any]:
        """Live facts for the presence bucket: `param_bytes`, and `loras` where adapters load."""
        ...


def param_bytes(*modules: Any) -> int:
    """Bytes the parameters and buffers of torch modules take (what a loaded model costs)."""
    total = 0
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            total += t.numel() * t.element_size()
    return total


RunnerLoader = Callable[[str, Settings], ModelRunner]


@dataclass
class ServiceSpec:
    """What a service module declares: its name, default models and how to load one.
    `module`: what `python -m` runs it as, where that is not `services.<name>`."""

    name: str
    default_models: list[str]
    load: RunnerLoader
    description: str
    module: str = ""

    @property
    def entry_point(self) -> str:
        return self.module or f"services.{self.name}"
