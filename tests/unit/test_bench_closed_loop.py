"""The closed-loop throughput `bench/parallel.py` compares systems by: the steady rate, without
the ramp and the drain, so two systems serving at the same rate score the same however their
clients' answers are staggered or shared out (a whole-run count would charge the stagger's drain
to one)."""

from __future__ import annotations

import pytest

from bench.parallel_systems import steady_rate


def test_the_same_steady_rate_scores_the_same_whatever_the_stagger() -> None:
    # 2 clients, 4 requests each, one request per 2.16 s per device.
    in_step = [[2.16, 4.32, 6.48, 8.64], [2.16, 4.32, 6.48, 8.64]]
    # The same rate, the second client one step behind (its first request waited for a split step).
    staggered = [[1.67, 3.83, 5.99, 8.15], [2.75, 4.91, 7.07, 9.23]]
    assert steady_rate(in_step) == pytest.approx(2 / 2.16)
    assert steady_rate(staggered) == pytest.approx(2 / 2.16)
    assert 8 / 9.23 < 0.94 * (8 / 8.64)  # what the whole-run count made of the stagger


def test_clients_served_unevenly_count_at_the_systems_rate() -> None:
    # 4 clients, 3 requests each, 2 devices answering in pairs every second; the first two
    # clients are served first every time, the others wait: the system still answers 2 a second.
    uneven = [[1.0, 3.0, 5.0], [1.0, 3.0, 5.0], [2.0, 4.0, 6.0], [2.0, 4.0, 6.0]]
    assert steady_rate(uneven) == pytest.approx(2.0)


def test_a_slower_system_scores_lower_and_too_few_answers_have_no_window() -> None:
    assert steady_rate([[1.0, 3.0, 5.0], [1.0, 3.0, 5.0]]) == pytest.approx(1.0)
    assert steady_rate([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]) == pytest.approx(2.0)
    assert steady_rate([[1.0, 2.0], [1.2, 2.2]]) is None
