"""Where a mesh request's time goes, from the spans its processes printed.

A bench that runs the mesh with `OTEL_TRACES_EXPORTER=console` gets every span as a JSON object
in the services' logs (mixed with their log lines). This reads them back and sums, per request
and span name, the seconds spent (tensor pulls also per transport), then prints medians over
the requests: enough to say which part of the mesh's added time is the bus, a tensor hop, the
model or the gateway, without a Jaeger.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT_PREFIX = "generate "  # the gateway's span per request (services/gateway/orchestrator.py)


def read_spans(log_dir: Path) -> list[dict[str, Any]]:
    """Every console-exported span in the `*.log` files of `log_dir` (other lines skipped)."""
    decoder = json.JSONDecoder()
    spans = []
    for path in sorted(log_dir.glob("*.log")):
        text = path.read_text(errors="replace")
        at = 0
        while (at := text.find('{\n    "name"', at)) >= 0:
            try:
                obj, end = decoder.raw_decode(text, at)
            except json.JSONDecodeError:
                at += 1
                continue
            spans.append(obj)
            at = end
    return spans


def _seconds(span: dict[str, Any]) -> float:
    start = datetime.fromisoformat(span["start_time"].replace("Z", "+00:00"))
    end = datetime.fromisoformat(span["end_time"].replace("Z", "+00:00"))
    return (end - start).total_seconds()


def per_request(spans: list[dict[str, Any]], request_ids: list[str]) -> list[dict[str, float]]:
    """For each request id (the gateway's X-Request-Id) found: span name -> seconds summed over
    the request's trace; tensor pulls also as `tensor.pull <transport>` and their bytes as
    `MiB pulled <transport>`."""
    roots = {
        s["attributes"].get("lego.request_id"): s["context"]["trace_id"]
        for s in spans
        if s["name"].startswith(ROOT_PREFIX)
    }
    by_trace: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in spans:
        by_trace[s["context"]["trace_id"]].append(s)
    out = []
    for rid in request_ids:
        if rid not in roots:
            continue
        sums: dict[str, float] = defaultdict(float)
        for s in by_trace[roots[rid]]:
            name = "request" if s["name"].startswith(ROOT_PREFIX) else s["name"]
            sums[name] += _seconds(s)
            if s["name"] == "tensor.pull":
                transport = s["attributes"].get("tensor.transport", "?")
                sums[f"tensor.pull {transport}"] += _seconds(s)
                sums[f"MiB pulled {transport}"] += s["attributes"].get("tensor.bytes", 0) / 2**20
        out.append(dict(sums))
    return out


def report(rows: list[dict[str, float]]) -> str:
    """Medians over requests, one line per span name (ms; MiB for the byte counts)."""
    if not rows:
        return "spans: none found (was OTEL_TRACES_EXPORTER=console set for the mesh?)"
    names = sorted({k for r in rows for k in r}, key=lambda k: (k.startswith("MiB"), k != "request", k))
    lines = [f"spans, medians over {len(rows)} requests (summed per request; steps overlap):"]
    for name in names:
        value = statistics.median(r.get(name, 0.0) for r in rows)
        shown = f"{value:>10.2f} MiB" if name.startswith("MiB") else f"{value * 1000:>8.1f} ms"
        lines.append(f"  {name:<34} {shown}")
    return "\n".join(lines)
