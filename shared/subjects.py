"""Every NATS subject, stream and consumer name is built here and nowhere else."""

from __future__ import annotations

import re

from shared.messages import StepKind

STEP_STREAM = "LEGO_STEPS"
STEP_SUBJECTS = "lego.step.>"
RESULT_STREAM = "LEGO_RESULTS"
RESULT_SUBJECTS = "lego.result.>"
RELEASE_SUBJECT = "lego.release"
CANCEL_SUBJECT = "lego.cancel"  # core NATS: a request was cancelled; payload = its run id

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def _check_token(value: str, what: str) -> str:
    if not _TOKEN.match(value):
        raise ValueError(f"{what} {value!r} may hold only letters, digits, '-' and '_' (it is a subject token)")
    return value


def step_subject(kind: StepKind | str, model_id: str) -> str:
    """`lego.step.<kind>.<model_id>`: one subject per (kind, model), shared by all its replicas."""
    return f"lego.step.{_check_token(str(kind), 'kind')}.{_check_token(model_id, 'model id')}"


def consumer_name(kind: StepKind | str, model_id: str) -> str:
    """The durable pull consumer that every replica of a model shares (competing consumers)."""
    return f"{_check_token(str(kind), 'kind')}__{_check_token(model_id, 'model id')}"


def result_subject(gateway_id: str) -> str:
    return f"lego.result.{_check_token(gateway_id, 'gateway id')}"


def progress_subject(gateway_id: str) -> str:
    return f"lego.progress.{_check_token(gateway_id, 'gateway id')}"


def max_deliveries_advisory() -> str:
    """JetStream's advisory when a step consumer gives up on a message after MaxDeliver."""
    return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{STEP_STREAM}.*"


def step_msg_id(request_id: str, node_id: str, attempt: int) -> str:
    """`Nats-Msg-Id` of a step publish: JetStream drops a second publish of the same attempt."""
    return f"{request_id}:{node_id}:{attempt}"


def result_msg_id(request_id: str, node_id: str, attempt: int) -> str:
    """`Nats-Msg-Id` of a result: a redelivered step cannot publish a second result, while a
    re-planned attempt (new attempt number) can."""
    return f"{request_id}:{node_id}:{attempt}:result"
