"""The simulator checked against reality at the scale this machine allows (issue 15): a short
seeded trace replayed through the mesh `lego up` starts and through the simulator with this
machine's profile, measured on that mesh right before, gives SLO attainment within 10 points.

Both run under `make replay` (LEGO_REPLAY_FULL=1), not in CI: the CI suite is at its time
budget, and the small one (a load the mesh keeps up with but for a few requests a burst queues)
mostly compares 100% with 100%. The knee of the attainment curve, where a few per cent of
capacity move attainment by tens of points, is the one that matters: three trials. Either reports a comparison
as inconclusive (skipped) when it failed while other work kept this machine's cores busy: the
simulation knows nothing of someone else's load (bench/replay.py prints the details).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from bench import fidelity

BAND_POINTS = 10.0


def compare(tmp_path: Path, model_cache: Path, trace: list, load: fidelity.Load, repeats: int) -> fidelity.Comparison:
    workflows = list(dict.fromkeys(fidelity.workflow_of(r) for r in trace))
    mesh = fidelity.start_mesh(workflows, tmp_path / "logs", str(model_cache))
    try:
        return asyncio.run(fidelity.compare(mesh, trace, load, cores=2, solo_runs=3, repeats=repeats))
    finally:
        mesh.stop()
        leftover = [c.name for c in mesh.children if c.alive()]
        assert not leftover, f"processes left behind: {leftover}"


def check(c: fidelity.Comparison) -> None:
    trials = "; ".join(
        f"real {t.real:.0%} simulated {t.simulated_attainment:.0%} (others' cores {t.run.cpu['others']:.2f})"
        for t in c.trials
    )
    got = f"{trials} (means {c.real:.0%} / {c.simulated_attainment:.0%})"
    print(f"replay: {got}, difference {c.difference_points:.0f} points")
    assert all(o.latency_s is not None for t in c.trials for o in t.run.outcomes), "a real request failed"
    assert all(o.latency_s is not None for t in c.trials for o in t.simulated), "a simulated request never finished"
    if c.difference_points > BAND_POINTS and c.busy_elsewhere > fidelity.BUSY_ELSEWHERE_MAX:
        pytest.skip(f"inconclusive: other work kept {c.busy_elsewhere:.2f} cores of this machine busy ({got})")
    assert c.difference_points <= BAND_POINTS, got


@pytest.mark.replay
@pytest.mark.skipif("LEGO_REPLAY_FULL" not in os.environ, reason="`make replay` runs it")
def test_short_replay_attainment_real_and_simulated_within_10_points(tmp_path: Path, model_cache: Path) -> None:
    # 29 requests in 10 s, a burst of 2x from 3 s to 5 s (about 5 req/s) that queues a few.
    trace = fidelity.short_trace(seed=3, duration_s=10.0, rate=2.5, burst=(3.0, 2.0, 2.0))
    c = compare(tmp_path, model_cache, trace, fidelity.Load(), repeats=1)
    check(c)


@pytest.mark.replay
@pytest.mark.skipif("LEGO_REPLAY_FULL" not in os.environ, reason="the full-size replay: `make replay` runs it")
def test_replay_at_the_knee_real_and_simulated_within_10_points(tmp_path: Path, model_cache: Path) -> None:
    # bench/replay.py's trace at 4.5 req/s: about 40% attainment on the 2-core box (bench/RESULTS.md)
    trace = fidelity.short_trace(seed=15, duration_s=20.0, rate=4.5, burst=(5.0, 3.0, 3.0))
    c = compare(tmp_path, model_cache, trace, fidelity.Load(), repeats=3)
    check(c)
    assert 0.0 < c.real < 1.0 or 0.0 < c.simulated_attainment < 1.0, "not at the knee: all met or all missed"
