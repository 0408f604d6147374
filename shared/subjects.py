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


# Priority bands of a model's steps, highest first: (band, the lowest request priority in it).
# A step of priority >= 5 goes to `lego.step.<kind>.<model>.high`, with a durable consumer of its
# own (`<kind>__<model>__high`: a WorkQueue stream needs consumers whose filters do not overlap);
# the rest keep the band-less subject and consumer that existing streams, deployments and KEDA
# triggers already name. Replicas pull the bands in this order (shared/priority_pull.py).
NORMAL_BAND = ""
PRIORITY_BANDS: tuple[tuple[str, int], ...] = (("high", 5), (NORMAL_BAND, 0))
BAND_NAMES: tuple[str, ...] = tuple(name for name, _ in PRIORITY_BANDS)


def band_of(priority: int) -> str:
    """The band a step of `priority` (0-9) queues in."""
    for name, floor in PRIORITY_BANDS:
        if priority >= floor:
            return name
    return NORMAL_BAND


def band_rank(priority: int) -> int:
    """0 for the highest band; the band of `priority` is served before every band of a larger rank."""
    return BAND_NAMES.index(band_of(priority))


def bands_at_or_above(priority: int) -> tuple[str, ...]:
    """The bands whose steps a step of `priority` waits behind: its own and the higher ones."""
    return BAND_NAMES[: band_rank(priority) + 1]


def _check_band(band: str) -> str:
    if band not in BAND_NAMES:
        raise ValueError(f"unknown priority band {band!r}; known: {BAND_NAMES}")
    return band


def step_subject(kind: StepKind | str, model_id: str, band: str = NORMAL_BAND) -> str:
    """`lego.step.<kind>.<model_id>[.<band>]`: one subject per (kind, model, band), shared by all its replicas."""
    base = f"lego.step.{_check_token(str(kind), 'kind')}.{_check_token(model_id, 'model id')}"
    return f"{base}.{band}" if _check_band(band) else base


def consumer_name(kind: StepKind | str, model_id: str, band: str = NORMAL_BAND) -> str:
    """The durable pull consumer of one band that every replica of a model shares (competing consumers)."""
    base = f"{_check_token(str(kind), 'kind')}__{_check_token(model_id, 'model id')}"
    for other in BAND_NAMES:
        if other and base.endswith(f"__{other}"):
            raise ValueError(f"model id {model_id!r} may not end in '__{other}': that names a priority band")
    return f"{base}__{band}" if _check_band(band) else base


def parse_consumer_name(name: str) -> tuple[str, str, str] | None:
    """(kind, model id, band) of a step consumer's name; None for a name `consumer_name` never builds."""
    kind, sep, rest = name.partition("__")
    if not sep or not kind or not rest:
        return None
    for band in BAND_NAMES:
        if band and rest.endswith(f"__{band}"):
            return kind, rest[: -len(band) - 2], band
    return kind, rest, NORMAL_BAND


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
