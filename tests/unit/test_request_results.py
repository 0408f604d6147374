"""A gateway keeps finished requests' images only for the newest ones: the status and the final
event both hold them, and both must let go, or memory grows with every request served."""

from __future__ import annotations

from types import SimpleNamespace

from services.gateway import answering
from services.gateway.request_state import RequestState
from shared.workflows.catalogue import get_workflow


async def test_old_results_lose_their_images_in_status_and_events():
    orchestrator = SimpleNamespace(requests={})
    total = answering.KEEP_RESULTS + 3
    for i in range(total):
        state = RequestState(request_id=str(i), workflow=get_workflow("sd3"), params={}, deadline=0)
        state.result = {"data": [{"b64_json": "aW1hZ2U="}], "seed": i}
        state.log.emit({"type": "result", **state.result})
        orchestrator.requests[str(i)] = state

    answering.forget_old_results(orchestrator)

    kept = [s.request_id for s in orchestrator.requests.values() if s.result is not None]
    assert kept == [str(i) for i in range(3, total)]
    for i in range(3):
        old = orchestrator.requests[str(i)]
        assert old.log.events[-1]["type"] == "result" and old.log.events[-1]["data"] == []
        assert old.log.events[-1]["images_dropped"] is True and old.log.events[-1]["seed"] == i
    assert orchestrator.requests[str(total - 1)].log.events[-1]["data"] == [{"b64_json": "aW1hZ2U="}]
