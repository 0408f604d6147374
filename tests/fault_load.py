"""N asynchronous requests in flight through the REST API while something breaks; then count
what became of them, as a user would: done / errors / lost / duplicated.

- done: the request reached `succeeded`.
- errors: it reached `failed` or `cancelled`, or its POST was refused (an answer, not a loss).
- lost: it never reached a final status within the wait (or the gateway forgot its id).
- duplicated: step runs beyond one per finished node: the steps the replicas computed (their
  /metrics) minus the nodes the requests finished. A step runs twice when its ack died with a
  server and JetStream delivered it to another replica (one that got it again itself knows
  it answered it); the second result is dropped by the result stream's dedupe, so no image is
  made twice, but the work is.

A client retries only what a real one would: a POST that failed on the connection before an
answer came back, with the same X-Request-Id (a 409 then means the first one got through).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

FINAL = {"succeeded", "failed", "cancelled"}
QUICK = {"prompt": "a lighthouse in a storm", "size": "64x64", "num_inference_steps": 2, "wait": False}
POST_TRIES = 5


def fault_requests(default: int = 10) -> int:
    """Requests in flight per fault test: LEGO_FAULT_REQUESTS (`make faults`: 200), else `default`."""
    return int(os.environ.get("LEGO_FAULT_REQUESTS", default))


@dataclass
class Counts:
    sent: int = 0
    done: int = 0
    errors: int = 0
    lost: int = 0
    duplicated: int = 0
    redelivered: int = 0  # deliveries of steps answered already, recognised and not run again
    error_codes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds each phase took

    def line(self, what: str) -> str:
        codes = f" {self.error_codes}" if self.error_codes else ""
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in self.phases.items())
        return (
            f"{what}: {self.sent} requests: done {self.done} / errors {self.errors} / lost {self.lost} / "
            f"duplicated {self.duplicated} step runs (redelivered, not run again: {self.redelivered}){codes} "
            f"in {self.seconds:.1f}s ({phases})"
        )


async def _post(client: httpx.AsyncClient, url: str, request_id: str, seed: int) -> tuple[int, str]:
    """POST one async request; (status, error code or "")."""
    for attempt in range(POST_TRIES):
        try:
            r = await client.post(
                f"{url}/v1/images/generations",
                json={**QUICK, "seed": seed, "timeout_s": 600},
                headers={"X-Request-Id": request_id},
            )
        except httpx.TransportError:
            if attempt == POST_TRIES - 1:
                return 0, "connection"
            await asyncio.sleep(0.5 * (attempt + 1))
            continue
        if r.status_code == 202:
            return 202, ""
        if r.status_code == 409 and attempt > 0:  # our first try got through after all
            return 202, ""
        return r.status_code, r.json().get("error", {}).get("code", "?")
    return 0, "connection"


async def _final_status(client: httpx.AsyncClient, url: str, request_id: str, give_up: float) -> dict | None:
    """The request's status once it is final; None if it never got there by `give_up`."""
    while time.monotonic() < give_up:
        try:
            r = await client.get(f"{url}/v1/requests/{request_id}")
            if r.status_code == 200 and r.json()["status"] in FINAL:
                return r.json()
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.5)
    return None


def steps_done(url: str, outcome: str = "ok") -> int:
    """Steps the replicas answered with `outcome` (`lego_steps_total` on each replica's
    /metrics): "ok", computed; "duplicate", a redelivery the replica knew it had answered and
    acked without running it again."""
    models = httpx.get(f"{url}/v1/models", timeout=30).json()["models"]
    endpoints = {r["metrics_url"] for m in models for r in m["replicas"] if r["metrics_url"]}
    total = 0.0
    for endpoint in endpoints:
        for line in httpx.get(endpoint, timeout=30).text.splitlines():
            if line.startswith("lego_steps_total{") and f'outcome="{outcome}"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return int(total)


async def _run(url: str, n: int, fault: Callable[[], None], wait_s: float, tag: str) -> Counts:
    counts = Counts(sent=n)
    before, redelivered_before = steps_done(url), steps_done(url, "duplicate")
    ids = [f"{tag}-{i}" for i in range(n)]
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        clock = time.monotonic()
        posted = await asyncio.gather(*(_post(client, url, rid, i) for i, rid in enumerate(ids)))
        counts.phases["post"], clock = time.monotonic() - clock, time.monotonic()
        await asyncio.to_thread(fault)  # with every request accepted and in flight
        counts.phases["fault"], clock = time.monotonic() - clock, time.monotonic()
        accepted = [rid for rid, (status, _) in zip(ids, posted, strict=True) if status == 202]
        for status, code in posted:
            if status != 202:
                counts.errors += 1
                counts.error_codes[f"POST {status} {code}"] = counts.error_codes.get(f"POST {status} {code}", 0) + 1
        give_up = time.monotonic() + wait_s
        finals = await asyncio.gather(*(_final_status(client, url, rid, give_up) for rid in accepted))
        counts.phases["finish"], clock = time.monotonic() - clock, time.monotonic()
    nodes_done = sum(1 for final in finals if final for state in final["nodes"].values() if state == "done")
    for final in finals:
        if final is None:
            counts.lost += 1
        elif final["status"] == "succeeded":
            counts.done += 1
        else:
            counts.errors += 1
            code = (final.get("error") or {}).get("code", final["status"])
            counts.error_codes[code] = counts.error_codes.get(code, 0) + 1
    counts.duplicated = steps_done(url) - before - nodes_done
    counts.redelivered = steps_done(url, "duplicate") - redelivered_before
    counts.phases["count steps"] = time.monotonic() - clock
    return counts


def requests_under_fault(
    url: str, n: int, fault: Callable[[], None], wait_s: float = 300.0, tag: str = "fault"
) -> Counts:
    """Post `n` async requests, run `fault()` (on a thread) once all are accepted, wait up to
    `wait_s` for each to end; the counts. Call it on a mesh no other test uses meanwhile (the
    step counts are the mesh's), with replicas that have computed nothing yet."""
    started = time.monotonic()
    counts = asyncio.run(_run(url, n, fault, wait_s, tag))
    counts.seconds = time.monotonic() - started
    return counts
