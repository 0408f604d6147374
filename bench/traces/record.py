"""One trace request, and the JSONL file format every trace tool here reads and writes.

Why these fields: they are the published Katz/SwiftDiffusion production trace's (timestamp, base
model, ControlNets, LoRAs), so a generated trace and a replayed published one are the same
thing to the simulator and to `lego up` replays. `workflow` is optional: our own catalogue name
when a generator or a mapping chose one, else derived from the rest by the consumer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class TraceRequest:
    timestamp: float  # seconds from the trace's start
    base_model: str  # e.g. "sdxl", "sd3", "flux"
    controlnets: tuple[str, ...] = ()
    loras: tuple[str, ...] = ()
    workflow: str | None = None
    extra: dict[str, object] = field(default_factory=dict, compare=False)

    def to_json(self) -> str:
        obj: dict[str, object] = {
            "timestamp": round(self.timestamp, 6),
            "base_model": self.base_model,
            "controlnets": list(self.controlnets),
            "loras": list(self.loras),
        }
        if self.workflow is not None:
            obj["workflow"] = self.workflow
        obj.update(self.extra)
        return json.dumps(obj, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> TraceRequest:
        obj = json.loads(line)
        known = {"timestamp", "base_model", "controlnets", "loras", "workflow"}
        return cls(
            timestamp=float(obj["timestamp"]),
            base_model=str(obj["base_model"]),
            controlnets=tuple(str(c) for c in obj.get("controlnets") or ()),
            loras=tuple(str(lo) for lo in obj.get("loras") or ()),
            workflow=obj.get("workflow"),
            extra={k: v for k, v in obj.items() if k not in known},
        )


def write_jsonl(path: str | Path, requests: Iterable[TraceRequest]) -> int:
    """Write one request a line; returns how many."""
    n = 0
    with open(path, "w") as f:
        for r in requests:
            f.write(r.to_json() + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> Iterator[TraceRequest]:
    """The requests of a JSONL trace, in file order (blank lines skipped)."""
    with open(path) as f:
        for line in f:
            if line.strip():
                yield TraceRequest.from_json(line)
