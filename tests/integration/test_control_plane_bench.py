"""bench/control_plane.py's step hop, briefly: steps really go through JetStream to replica
processes on the mesh's consume loop, and every count agrees (published, delivered by the
consumer, answered), nothing left pending. The full measurement is the script's (not CI's)."""

from __future__ import annotations

import asyncio
import re

from bench.control_plane import last_line
from bench.hop import run_hops


def test_no_op_steps_go_through_jetstream_and_every_count_agrees() -> None:
    (run,) = asyncio.run(run_hops([2], seconds=1.0, in_flight=8, solo_steps=20, max_processes=1))
    assert run["replicas"] == 2 and run["processes"] == 1
    assert run["steps"] > 0 and run["steps_per_s"] > 0
    assert run["solo_steps"] == 20 and 0 < run["solo_p50_ms"] <= run["solo_p99_ms"]
    assert 0 < run["p50_ms"] <= run["p99_ms"]
    # Every step published was delivered once by the model's JetStream consumer and answered once.
    assert run["published"] == run["delivered"] == run["results"] >= run["steps"] + 20
    assert run["acked_all"], "steps left pending or unacked in the consumer"
    assert set(run["cpu_ms_per_step"]) == {"driver", "nats-server", "replicas"}
    assert all(ms > 0 for ms in run["cpu_ms_per_step"].values())
    # The floors it is compared with were measured: core NATS, and a bare JetStream hop.
    assert 0 < run["echo_floor"]["p50_ms"] and 0 < run["js_floor"]["p50_ms"] <= run["js_floor"]["p99_ms"]
    assert re.fullmatch(r"control plane: \d+ steps/s, p50 \d+\.\d\d ms", last_line(run))
