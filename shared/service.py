"""The runtime every model service shares: settings -> load models -> consume steps -> results.

A service only supplies `ModelRunner`s (which model, which step kind, and a plain function
from input tensors to output tensors) and a `ServiceSpec`; its `__main__` calls `main(SPEC)`.
Everything else lives in shared/ once, a module a job: the command line (`service_cli`), the
process from start to stop (`replica`), one step on a model (`step_handler`, with its
`input_cache`), and the delivery rules (`worker`).
"""

from __future__ import annotations

import logging

from shared import tracing
from shared.lifecycle import run_until_stopped
from shared.logs import setup_logging
from shared.model_runner import ModelRunner, ProgressFn, RunnerLoader, ServiceSpec, StepContext, param_bytes
from shared.replica import serve
from shared.service_cli import parse_args

__all__ = ["ModelRunner", "ProgressFn", "RunnerLoader", "ServiceSpec", "StepContext", "main", "param_bytes"]

log = logging.getLogger("lego.service")


def main(spec: ServiceSpec, argv: list[str] | None = None) -> None:
    settings, models = parse_args(spec, argv)
    setup_logging(spec.name, settings.log_level)
    tracing.setup(spec.name)  # on only where OTEL_* asks for it
    try:
        run_until_stopped(serve(spec, settings, models), log)
    finally:
        tracing.shutdown()  # send the spans still batched
