"""Load the published Katz/SwiftDiffusion production trace, so a user who has it can replay it.

The real layout, from the study's own artifact (github.com/modelscope/Katz, `trace/README.md`
and the analysis scripts beside it, which read it with `json.load`): one file,
`diffusion_model_request_trace.json` (downloadable with `modelscope download --dataset
'mental2008/T2I-Model-Serving-Request-Trace' diffusion_model_request_trace.json`), holding a
single JSON array of ~550k objects, one a request, with the fields

    timestamp      when the request was made: a number of seconds (the scripts sort and
                   subtract it as such)
    ip             the serving instance
    scene_id       the service, "A" or "B"
    base_model_id  anonymised base model id (may be null)
    controlnets    list of anonymised ControlNet ids, or null
    loras          list of anonymised LoRA ids, or null

Also read, for files a user converted: the same objects one a line (JSON lines, e.g. `jq -c
'.[]'`), and CSV with those columns (a list cell as a JSON list, or names separated by ';' or
'|'). Column names are matched loosely (`base_model`, `model`, `controlnet_ids`, `time`, ...).
Timestamps become seconds from the first request (numbers above 1e11 are taken as
milliseconds; ISO 8601 strings are parsed); requests are sorted by time. Only JSON and CSV are
parsed: nothing here unpickles.

The ids are anonymised, so a loaded request's `base_model` is the trace's id, not one of our
families; `popularity_map` maps the most used ids to our families (most used to `sdxl`, as the
study's services are SDXL) so a replay can run on our catalogue, `workflow` then set by
`workflow_of`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from bench.traces.record import TraceRequest
from bench.traces.workflows import FAMILIES, workflow_of

# Our field -> the names a file may use for it, the published one first.
COLUMNS: dict[str, tuple[str, ...]] = {
    "timestamp": ("timestamp", "time", "ts", "arrival_time", "request_time", "created_at"),
    "base_model": ("base_model_id", "base_model", "base_model_name", "model_id", "model"),
    "controlnets": ("controlnets", "controlnet", "controlnet_ids", "controlnet_list"),
    "loras": ("loras", "lora", "lora_ids", "lora_list"),
}
REQUIRED = ("timestamp", "controlnets", "loras")  # base_model_id may be null in the published file
MILLISECONDS_ABOVE = 1e11  # a seconds epoch passes 1e11 in the year 5138


class KatzFormatError(ValueError):
    """The file is not a Katz trace: says which record and which columns were expected."""


def expected_columns() -> str:
    return ", ".join(f"{field} (as {' / '.join(names)})" for field, names in COLUMNS.items())


def load_katz(
    path: str | Path,
    service: str | None = None,
    base_model_map: Mapping[str, str] | None = None,
) -> list[TraceRequest]:
    """The trace's requests, sorted by time, timestamps in seconds from the first one.

    `service` keeps one service's requests ("A" or "B", the `scene_id`); `ip` and `scene_id`
    stay in `extra`. `base_model` is the trace's id ("unknown" where null), `workflow` None,
    unless `base_model_map` maps ids to our families (see `to_families`).
    """
    rows = _records(Path(path))
    requests = []
    for i, row in enumerate(rows):
        fields = _fields(row, i)
        if service is not None:
            if "scene_id" not in row:
                raise KatzFormatError(f"record {i}: no 'scene_id' column to pick service {service!r} by")
            if str(row["scene_id"]) != service:
                continue
        requests.append(_request(fields, row))
    requests.sort(key=lambda r: r.timestamp)
    t0 = requests[0].timestamp if requests else 0.0
    requests = [replace(r, timestamp=r.timestamp - t0) for r in requests]
    return to_families(requests, base_model_map) if base_model_map else requests


def to_families(requests: Iterable[TraceRequest], base_model_map: Mapping[str, str]) -> list[TraceRequest]:
    """Requests on mapped base-model ids moved onto our families (adapters prefixed `<family>/`,
    `workflow` from `workflow_of`, the trace's id kept as `extra["trace_base_model"]`); the others
    unchanged."""
    out = []
    for r in requests:
        family = base_model_map.get(r.base_model)
        if family is None:
            out.append(r)
            continue
        out.append(
            TraceRequest(
                r.timestamp,
                family,
                tuple(f"{family}/{c}" for c in r.controlnets),
                tuple(f"{family}/{lo}" for lo in r.loras),
                workflow_of(family, bool(r.controlnets), bool(r.loras)),
                {**r.extra, "trace_base_model": r.base_model},
            )
        )
    return out


def popularity_map(requests: Iterable[TraceRequest], families: Sequence[str] = FAMILIES) -> dict[str, str]:
    """The most used base-model ids mapped to `families` in order (ids beyond them unmapped)."""
    counts = Counter(r.base_model for r in requests if r.base_model != "unknown")
    return {bid: fam for (bid, _), fam in zip(counts.most_common(len(families)), families, strict=False)}


def _records(path: Path) -> list[dict[str, object]]:
    text = path.read_text()
    head = text.lstrip()[:1]
    if head == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise KatzFormatError(f"{path}: not valid JSON ({e}); expected a JSON array of requests") from e
        if not all(isinstance(r, dict) for r in data):
            raise KatzFormatError(f"{path}: the JSON array must hold objects with {expected_columns()}")
        return data
    if head == "{":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise KatzFormatError(f"{path}:{n}: not a JSON object ({e})") from e
                if not isinstance(obj, dict):
                    raise KatzFormatError(f"{path}:{n}: not a JSON object; expected {expected_columns()}")
                out.append(obj)
        return out
    if not head:
        raise KatzFormatError(f"{path}: empty file; expected a JSON array of requests with {expected_columns()}")
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    missing = [f for f in REQUIRED if not any(n in header for n in COLUMNS[f])]
    if missing:
        raise KatzFormatError(
            f"{path}: not a Katz trace: a CSV header {header} lacks {missing}; expected {expected_columns()}"
        )
    return list(reader)


def _fields(row: Mapping[str, object], i: int) -> dict[str, object]:
    out: dict[str, object] = {}
    for field, names in COLUMNS.items():
        found = next((n for n in names if n in row), None)
        if found is None and field in REQUIRED:
            raise KatzFormatError(f"record {i}: no {field!r} column (has {sorted(row)}); expected {expected_columns()}")
        out[field] = row.get(found) if found else None
    try:
        out["timestamp"] = _seconds(out["timestamp"])
        out["controlnets"] = _names(out["controlnets"])
        out["loras"] = _names(out["loras"])
    except (TypeError, ValueError) as e:
        raise KatzFormatError(f"record {i}: {e}; expected {expected_columns()}") from e
    return out


def _seconds(value: object) -> float:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"timestamp {value!r} is not a time")
    if isinstance(value, int | float):
        t = float(value)
    else:
        text = str(value).strip()
        try:
            t = float(text)
        except ValueError:
            t = datetime.fromisoformat(text).timestamp()  # ValueError names the bad string
    if not math.isfinite(t):
        raise ValueError(f"timestamp {value!r} is not finite")
    return t / 1000 if t > MILLISECONDS_ABOVE else t


def _names(value: object) -> tuple[str, ...]:
    """A list of adapter ids: a JSON list, null, or (CSV) a JSON list / ';' or '|' separated text."""
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(str(v) for v in value)
    if isinstance(value, str):
        text = value.strip()
        if text in ("", "[]", "null", "None"):
            return ()
        if text.startswith("["):
            parsed = json.loads(text)
            if not isinstance(parsed, list):
                raise ValueError(f"adapter list {value!r} is not a list")
            return tuple(str(v) for v in parsed)
        sep = ";" if ";" in text else "|"
        return tuple(part.strip() for part in text.split(sep) if part.strip())
    raise ValueError(f"adapter list {value!r} is not a list")


def _request(fields: Mapping[str, object], row: Mapping[str, object]) -> TraceRequest:
    raw_base = fields["base_model"]
    base = "unknown" if raw_base in (None, "") else str(raw_base)
    cns, loras, timestamp = fields["controlnets"], fields["loras"], fields["timestamp"]
    assert isinstance(cns, tuple) and isinstance(loras, tuple) and isinstance(timestamp, float)
    extra = {key: row[key] for key in ("ip", "scene_id") if key in row}
    return TraceRequest(timestamp, base, cns, loras, None, extra)
