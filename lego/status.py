"""`lego status`: the gateway's GET /v1/status as tables (units, consumers, latest decisions)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import httpx

from lego.keys import auth_headers, resolve_api_key


def cmd_status(args: argparse.Namespace) -> int:
    """Print the gateway's GET /v1/status: replicas and backlog per unit, the latest decisions."""
    try:
        r = httpx.get(f"{args.url}/v1/status", headers=auth_headers(resolve_api_key(args.api_key)), timeout=10)
        if r.status_code in (401, 403):
            print(f"lego status: {r.json()['error']['message']} (pass --api-key with an admin key)", file=sys.stderr)
            return 1
        r.raise_for_status()
        status = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        print(f"lego status: cannot read {args.url}/v1/status: {exc} (is `lego up` running?)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(format_status(status))
    return 0


def format_status(status: dict) -> str:
    """Tables: units (from the autoscaler), consumers (backlog per kind/model), decisions."""
    lines = []
    scaler = status.get("autoscaler")
    if scaler:
        lines.append(f"autoscaler: {scaler['actuator']} actuator, SLO {scaler['slo']}")
        rows = [("UNIT", "REPLICAS", "LIVE", "WANTS", "MIN..MAX", "BACKLOG", "RATE/S", "STEP S", "MEM MIB")]
        for u in scaler["units"]:
            rows.append(
                (
                    u["unit"],
                    str(u["replicas"]),
                    str(u["live"]),
                    str(u["desired"]),
                    f"{u['min_replicas']}..{u['max_replicas']}",
                    str(u["backlog"]),
                    f"{u['arrival_rate']:.2f}",
                    f"{u['seconds_per_item']:.3f}",
                    f"{u['memory_bytes'] / 2**20:.0f}",
                )
            )
        lines += _table(rows)
    else:
        lines.append("autoscaler: not running (lego up --no-autoscale, or none deployed)")
    lines.append("")
    rows = [("KIND", "MODEL", "REPLICAS", "PENDING", "ACK PENDING", "BACKLOG")]
    for c in status.get("consumers", []):
        rows.append(
            (c["kind"], c["model_id"], str(c["replicas"]), str(c["pending"]), str(c["ack_pending"]), str(c["backlog"]))
        )
    lines += _table(rows)
    decisions = (scaler or {}).get("decisions") or []
    if decisions:
        lines += ["", "latest decisions:"]
        for d in decisions[-10:]:
            when = time.strftime("%H:%M:%S", time.localtime(d["at"]))
            lines.append(f"  {when} {d['unit']} {d['from_replicas']} -> {d['to_replicas']}: {d['reason']}")
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
