"""The degree rule of a denoiser group (shared/parallel_policy.py), one test per rule: which
degrees a request can take, the fair share of the group, the deadline rescue, the fixed modes."""

from __future__ import annotations

import pytest

from services.autoscaler.policy import choose_degree as reexported
from shared.parallel_policy import MODES, DegreeInputs, choose_degree, usable_degrees

# Seconds a step at each degree: a split is faster but not twice as fast (the exchange).
STEP_S = {1: 1.0, 2: 0.55, 4: 0.35}


def _degree(k: int, busy: int = 0, allowed: tuple[int, ...] = (1, 2, 4), **kw) -> int:
    return choose_degree(DegreeInputs(group_size=k, allowed=allowed, busy=busy, **kw)).degree


def test_the_autoscaler_policy_holds_the_same_rule() -> None:
    assert reexported is choose_degree


def test_usable_degrees_fit_the_group_and_always_include_one() -> None:
    assert usable_degrees(DegreeInputs(group_size=2, allowed=(1, 2, 4))) == [1, 2]  # 4 does not fit in 2
    assert usable_degrees(DegreeInputs(group_size=4, allowed=(2, 4))) == [1, 2, 4]  # 1 even when not listed
    assert usable_degrees(DegreeInputs(group_size=4, allowed=())) == [1]  # a workflow that cannot be split
    assert usable_degrees(DegreeInputs(group_size=1, allowed=(1, 2, 4))) == [1]  # a lone device
    assert usable_degrees(DegreeInputs(group_size=4, allowed=(0, -2, 4, 2, 2))) == [1, 2, 4]
    # and the rule never hands out a degree outside them, whatever the load or mode
    for mode in MODES:
        assert choose_degree(DegreeInputs(group_size=2, allowed=(1, 4)), mode).degree == 1


@pytest.mark.parametrize(
    ("k", "busy", "expected"),
    [(2, 0, 2), (2, 1, 1), (2, 3, 1), (4, 0, 4), (4, 1, 2), (4, 3, 1)],
)
def test_fair_share_splits_a_lone_request_and_not_a_busy_groups(k: int, busy: int, expected: int) -> None:
    choice = choose_degree(DegreeInputs(group_size=k, allowed=(1, 2, 4), busy=busy))
    assert choice.degree == expected
    assert choice.reason.startswith("fair share")


def test_fair_share_takes_the_largest_allowed_degree_under_it() -> None:
    assert _degree(4, busy=0, allowed=(1, 2)) == 2  # a CFG-only split on an idle group of 4
    assert _degree(4, busy=1, allowed=(1, 4)) == 1  # a share of 2, and 2 is not allowed
    assert _degree(4, busy=-1) == 4  # a miscount below zero is an idle group, not an error


def test_deadline_rescue_borrows_free_devices_when_the_fair_share_would_miss() -> None:
    # Two other requests on a group of 4: the fair share is 1 device, 10 s for 10 steps; 6 s left.
    choice = choose_degree(DegreeInputs(group_size=4, allowed=(1, 2, 4), busy=2, slack_s=6.0, steps=10, step_s=STEP_S))
    assert choice.degree == 2  # the smallest degree that meets the deadline (5.5 s)
    assert choice.reason.startswith("deadline rescue")
    # With slack enough at the fair share, no rescue.
    assert _degree(4, busy=2, slack_s=11.0, steps=10, step_s=STEP_S) == 1


def test_no_rescue_when_the_group_is_saturated() -> None:
    assert _degree(4, busy=4, slack_s=4.0, steps=10, step_s=STEP_S) == 1
    assert _degree(2, busy=5, slack_s=4.0, steps=10, step_s=STEP_S) == 1


def test_no_rescue_when_no_degree_meets_the_slack() -> None:
    choice = choose_degree(DegreeInputs(group_size=4, allowed=(1, 2, 4), busy=2, slack_s=2.0, steps=10, step_s=STEP_S))
    assert choice.degree == 1 and choice.reason.startswith("fair share")
    assert _degree(4, busy=2, slack_s=-3.0, steps=10, step_s=STEP_S) == 1  # already late


def test_no_rescue_beyond_the_devices_the_others_leave_free() -> None:
    # Two others hold 2 of the 4 devices: degree 4 would meet 4 s, but would share their devices.
    assert _degree(4, busy=2, slack_s=4.0, steps=10, step_s=STEP_S) == 1
    # One other request on a group of 2: the second device is this request's fair share already.
    assert _degree(2, busy=1, slack_s=6.0, steps=10, step_s=STEP_S) == 1


def test_no_rescue_without_a_deadline_or_a_time_for_the_degrees() -> None:
    assert _degree(4, busy=2, slack_s=None, steps=10, step_s=STEP_S) == 1
    assert _degree(4, busy=2, slack_s=1.0, steps=10, step_s=None) == 1  # nothing measured yet
    assert _degree(4, busy=2, slack_s=6.0, steps=10, step_s={1: 1.0}) == 1  # degree 2 not measured


def test_never_and_always_ignore_load_and_deadline() -> None:
    for busy in (0, 1, 3, 8):
        never = choose_degree(DegreeInputs(4, (1, 2, 4), busy=busy, slack_s=0.1, steps=10, step_s=STEP_S), "never")
        always = choose_degree(DegreeInputs(4, (1, 2, 4), busy=busy, slack_s=99.0, steps=10, step_s=STEP_S), "always")
        assert (never.degree, always.degree) == (1, 4)
    assert choose_degree(DegreeInputs(4, (1, 2)), "always").degree == 2  # as far as the workflow can be split
    assert choose_degree(DegreeInputs(2, (1, 2, 4)), "always").degree == 2  # and the group holds


def test_an_unknown_mode_is_refused_naming_the_modes() -> None:
    with pytest.raises(ValueError, match="'sometimes'") as err:
        choose_degree(DegreeInputs(2, (1, 2)), "sometimes")
    for mode in MODES:
        assert mode in str(err.value)


# A tiny model: the exchange costs more than the halved matrix saves, a split step is slower.
TINY_STEP_S = {1: 0.0071, 2: 0.0204, 4: 0.0300}


def test_a_lone_request_takes_the_fastest_measured_degree_not_the_largest() -> None:
    choice = choose_degree(DegreeInputs(group_size=2, allowed=(1, 2), step_s={1: 0.0071, 2: 0.0204}))
    assert choice.degree == 1
    assert choice.reason == "fastest measured: degree 1 (7.1 ms/step) over 2 (20.4 ms/step)"
    # Where the split is faster, the fair share is also the fastest and keeps its name.
    fast = choose_degree(DegreeInputs(group_size=4, allowed=(1, 2, 4), step_s=STEP_S))
    assert fast.degree == 4 and fast.reason.startswith("fair share") and "fastest measured" in fast.reason
    # Only degrees up to the fair share compete: one other request leaves 2 of 4 devices.
    assert _degree(4, busy=1, step_s={1: 1.0, 2: 0.9, 4: 0.1}) == 2
    assert _degree(4, busy=1, step_s=TINY_STEP_S) == 1


def test_an_unmeasured_degree_is_tried_the_largest_first() -> None:
    assert _degree(2, step_s={}) == 2  # nothing measured: the fair share, as without times
    explore = choose_degree(DegreeInputs(group_size=2, allowed=(1, 2), step_s={2: 0.0204}))
    assert (explore.degree, explore.reason) == (1, "not yet measured: degree 1")
    assert _degree(4, step_s={4: 0.03}) == 2  # 2 before 1
    assert _degree(4, step_s={4: 0.03, 2: 0.02}) == 1
    assert _degree(4, step_s=TINY_STEP_S) == 1  # then the fastest
    # Under load only the fair share is a candidate: no exploration beyond it.
    only = choose_degree(DegreeInputs(group_size=2, allowed=(1, 2), busy=1, step_s={2: 0.0204}))
    assert only.degree == 1 and only.reason.startswith("fair share")


def test_deadline_rescue_starts_from_the_fastest_measured_degree() -> None:
    # 2 on 4 devices: the fastest candidate is 1 (but 10 s over 10 steps), 4 would take 2 s.
    step_s = {1: 1.0, 2: 1.1, 4: 0.2}
    choice = choose_degree(DegreeInputs(group_size=4, allowed=(1, 2, 4), busy=1, slack_s=3.0, steps=10, step_s=step_s))
    assert choice.degree == 1  # degree 4 would borrow a device the other request holds
    choice = choose_degree(DegreeInputs(group_size=4, allowed=(1, 2, 4), busy=0, slack_s=3.0, steps=10, step_s=step_s))
    assert choice.degree == 4  # idle: the fastest is 4 anyway
    late = choose_degree(
        DegreeInputs(group_size=4, allowed=(1, 2, 4), busy=2, slack_s=6.0, steps=10, step_s={1: 1.0, 2: 0.55})
    )
    assert late.degree == 2 and late.reason == "deadline rescue: 10.00 s at degree 1 > 6.00 s slack"


def test_a_choice_of_one_over_every_degree_stays_one_over_fewer() -> None:
    """The group places a request a follower may run whole before knowing which splits its call
    allows (group/engine.py: knowing costs the loop's start); that is only sound if a choice of
    1 over all degrees is 1 over any subset. Checked over loads, deadlines, measurements, modes."""
    import itertools

    measured = [None, {}, STEP_S, {1: 0.3, 2: 0.55}, {2: 0.2}, {1: 1.0, 2: 0.9, 4: 0.1}]
    subsets = [(1,), (1, 2), (1, 4), (2,), (4,), (1, 2, 4), ()]
    checked = 0
    for mode, k, busy, slack, step_s in itertools.product(MODES, (2, 4), range(5), (None, 0.5, 3.0, 50.0), measured):
        full = choose_degree(DegreeInputs(k, (1, 2, 4), busy=busy, slack_s=slack, steps=10, step_s=step_s), mode)
        if full.degree != 1:
            continue
        for allowed in subsets:
            fewer = DegreeInputs(k, allowed, busy=busy, slack_s=slack, steps=10, step_s=step_s)
            assert choose_degree(fewer, mode).degree == 1, (mode, k, busy, slack, step_s, allowed)
            checked += 1
    assert checked > 500  # the product above reaches the cases where 1 is chosen
