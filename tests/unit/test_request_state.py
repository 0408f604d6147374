"""A request's status moves only along the table of allowed transitions: each allowed move works
(and resolves or renews what `execute` waits on), every other move raises."""

from __future__ import annotations

from typing import get_args

import pytest

from services.gateway.request_state import TRANSITIONS, InvalidTransition, RequestState, RunStatus
from services.gateway.schemas import RequestStatus
from shared.workflows.catalogue import get_workflow

ALLOWED = [(before, after) for before, afters in TRANSITIONS.items() for after in sorted(afters)]
FORBIDDEN = [(before, after) for before in RunStatus for after in RunStatus if after not in TRANSITIONS[before]]
PATH_TO = {  # allowed moves that bring a new request (running) to each status
    RunStatus.RUNNING: [],
    RunStatus.SUCCEEDED: [RunStatus.SUCCEEDED],
    RunStatus.FAILED: [RunStatus.FAILED],
    RunStatus.CANCELLED: [RunStatus.CANCELLED],
}


def _state_in(status: RunStatus) -> RequestState:
    state = RequestState(request_id="r", workflow=get_workflow("sd3"), params={}, deadline=0)
    assert state.status is RunStatus.RUNNING and not state.finished.done()
    for step in PATH_TO[status]:
        state.move_to(step)
    assert state.status is status
    return state


def test_the_table_covers_every_status_and_the_api_shows_the_same_names():
    assert set(TRANSITIONS) == set(RunStatus)
    assert set(get_args(RequestStatus.model_fields["status"].annotation)) == {s.value for s in RunStatus}


@pytest.mark.parametrize(("before", "after"), ALLOWED, ids=lambda s: s.value)
async def test_every_allowed_transition_works(before, after):
    state = _state_in(before)
    state.move_to(after)
    assert state.status is after
    # Leaving running resolves what `execute` waits on; reopening gives it a new, pending one.
    assert state.finished.done() is (after is not RunStatus.RUNNING)


@pytest.mark.parametrize(("before", "after"), FORBIDDEN, ids=lambda s: s.value)
async def test_every_other_transition_raises_and_changes_nothing(before, after):
    state = _state_in(before)
    with pytest.raises(InvalidTransition):
        state.move_to(after)
    assert state.status is before


async def test_named_invalid_moves_raise():
    for before, after in [
        (RunStatus.CANCELLED, RunStatus.SUCCEEDED),  # a late result must not revive a cancelled request
        (RunStatus.FAILED, RunStatus.RUNNING),
        (RunStatus.SUCCEEDED, RunStatus.FAILED),
        (RunStatus.RUNNING, RunStatus.RUNNING),
    ]:
        with pytest.raises(InvalidTransition):
            _state_in(before).move_to(after)


async def test_a_reopened_request_can_succeed_again():
    """succeeded -> running is the re-plan of a request whose images were lost before the gateway
    pulled them: its output node runs again and it must be able to succeed once more."""
    state = _state_in(RunStatus.SUCCEEDED)
    state.move_to(RunStatus.RUNNING)
    state.move_to(RunStatus.SUCCEEDED)
    assert state.status is RunStatus.SUCCEEDED and state.finished.done()
