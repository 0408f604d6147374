"""`lego status`: the gateway's GET /v1/status as tables (units, consumers, latest decisions),
and the gateways behind the local balancer when `lego up --gateways N` runs several."""

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
    balancer = balancer_status(args.url)
    if balancer is not None:
        status["balancer"] = balancer
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(format_status(status))
    return 0


def balancer_status(url: str) -> dict | None:
    """What the local balancer (lego/balancer.py) at `url` says of its gateways; None when `url`
    is a gateway itself (it has no such route) or the answer is not the balancer's."""
    from lego.balancer import STATUS_PATH

    try:
        r = httpx.get(f"{url}{STATUS_PATH}", timeout=5, verify=False)
        body = r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    return body if isinstance(body, dict) and isinstance(body.get("backends"), list) else None


def format_gateways(balancer: dict | None, now: float | None = None) -> list[str]:
    """GATEWAY / IN ROTATION / SINCE / OPEN / SERVED / WHY, or the line saying there is one."""
    if balancer is None:
        return ["gateways: one, answering at this URL (lego up --gateways N runs more behind a balancer)"]
    now = time.time() if now is None else now
    rows = [("GATEWAY", "IN ROTATION", "FOR", "OPEN", "SERVED", "LAST CHECK")]
    for b in balancer["backends"]:
        rows.append(
            (
                b["address"],
                "yes" if b["healthy"] else "no",
                f"{max(0.0, now - b['since']):.0f}s",
                str(b["active"]),
                str(b["served"]),
                b["reason"],
            )
        )
    healthy = sum(b["healthy"] for b in balancer["backends"])
    return [f"gateways behind the balancer: {healthy} in rotation", *_table(rows)]


def format_nats(nats: dict | None) -> list[str]:
    """The bus in a line: one server, or a cluster and the step stream's copies."""
    if not nats:
        return []
    copies = f"step stream R{nats['step_stream_replicas']}"
    if not nats.get("cluster"):
        return [f"nats: one server; {copies}"]
    current = ", ".join(nats.get("current") or []) or "none"
    return [
        f"nats: cluster {nats['cluster']}, {nats['servers']} servers; {copies}, "
        f"leader {nats.get('leader') or 'none'}, current: {current}"
    ]


def format_status(status: dict) -> str:
    """Tables: the gateways (behind a balancer), the bus, units (from the autoscaler), consumers
    (backlog per kind/model), decisions."""
    lines = [*format_gateways(status.get("balancer")), *format_nats(status.get("nats")), ""]
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
