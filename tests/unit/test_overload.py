"""The gateway's overload check: what the backlog ahead of a request costs, and the 429."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.errors import APIError
from services.gateway.overload import ModelLoad, queue_wait_s, refuse_if_overloaded
from shared.workflows.catalogue import catalogue


class FixedView:
    def __init__(self, loads: dict[tuple[str, str], ModelLoad]) -> None:
        self._loads = self.fixed = loads

    async def loads(self) -> dict[tuple[str, str], ModelLoad]:
        return self._loads


def test_the_slowest_model_of_the_workflow_sets_the_wait() -> None:
    loads = {
        ("denoise", "sd3-transformer"): ModelLoad(backlog=6, replicas=2, seconds_per_item=2.0),  # 6 s
        ("encode", "t5"): ModelLoad(backlog=10, replicas=1, seconds_per_item=0.1),  # 1 s
        ("denoise", "flux-transformer"): ModelLoad(backlog=100, replicas=1, seconds_per_item=5.0),  # not sd3's
    }
    assert queue_wait_s(loads, catalogue()["sd3"]) == (6.0, "sd3-transformer")
    assert queue_wait_s(loads, catalogue()["flux"]) == (500.0, "flux-transformer")


@pytest.mark.parametrize(
    "load",
    [
        ModelLoad(backlog=50, replicas=1, seconds_per_item=0.0),  # never measured: unknown, not refused
        ModelLoad(backlog=50, replicas=0, seconds_per_item=3.0),  # no replica (yet): the autoscaler's call
        ModelLoad(backlog=0, replicas=1, seconds_per_item=3.0),
    ],
)
def test_unknown_or_empty_queues_count_as_no_wait(load: ModelLoad) -> None:
    assert load.wait_s() == 0.0


def test_a_request_that_cannot_make_its_deadline_gets_429_with_retry_after() -> None:
    view = FixedView({("denoise", "sd3-transformer"): ModelLoad(backlog=6, replicas=2, seconds_per_item=2.0)})
    with pytest.raises(APIError) as refused:
        asyncio.run(refuse_if_overloaded(view, catalogue()["sd3"], deadline_s=2.5))  # type: ignore[arg-type]
    assert refused.value.status == 429 and refused.value.code == "overloaded"
    assert refused.value.headers == {"Retry-After": "4"}
    assert "sd3-transformer" in refused.value.message and "timeout_s" in refused.value.message
    asyncio.run(refuse_if_overloaded(view, catalogue()["sd3"], deadline_s=6.0))  # type: ignore[arg-type]


def test_a_high_priority_request_counts_only_equal_or_higher_priority_work() -> None:
    """60 normal steps queued (a minute of work) and 2 high ones: a priority-9 request waits
    behind the 2 only, so a 10 s deadline admits it while a priority-0 one gets 429."""
    load = ModelLoad(backlog=62, replicas=1, seconds_per_item=1.0, bands=(("high", 2), ("", 60)))
    view = FixedView({("denoise", "sd3-transformer"): load})
    assert queue_wait_s(view.fixed, catalogue()["sd3"], priority=9) == (2.0, "sd3-transformer")
    asyncio.run(refuse_if_overloaded(view, catalogue()["sd3"], deadline_s=10.0, priority=9))  # type: ignore[arg-type]
    with pytest.raises(APIError) as refused:
        asyncio.run(refuse_if_overloaded(view, catalogue()["sd3"], deadline_s=10.0, priority=0))  # type: ignore[arg-type]
    assert refused.value.status == 429


def test_steps_still_at_earlier_stages_count_as_queued_at_their_model() -> None:
    """A burst sits at the text encoders; the denoiser's queue is empty, but the 6 requests
    admitted will each publish a denoise step within seconds: a new request waits behind them."""
    load = ModelLoad(backlog=0, replicas=2, seconds_per_item=2.0)
    view = FixedView({("denoise", "sd3-transformer"): load})
    sd3 = catalogue()["sd3"]
    assert queue_wait_s(view.fixed, sd3) == (0.0, "")
    coming = {("denoise", "sd3-transformer"): 6}
    assert queue_wait_s(view.fixed, sd3, coming=coming) == (6.0, "sd3-transformer")
    with pytest.raises(APIError):
        asyncio.run(refuse_if_overloaded(view, sd3, deadline_s=5.0, coming=coming))  # type: ignore[arg-type]


def test_the_gateway_counts_the_steps_its_running_requests_have_not_published() -> None:
    """Orchestrator.waiting_steps: the nodes of running requests not started yet, by (kind,
    model); a priority-9 request does not count normal-priority ones."""
    from services.gateway.orchestrator import Orchestrator
    from shared.settings import Settings
    from shared.workflows.step_params import RequestParams, step_params

    async def scenario() -> tuple[dict, dict]:
        gw = Orchestrator(None, None, Settings())  # type: ignore[arg-type]
        sd3 = catalogue()["sd3"]
        req = RequestParams(prompt="a boat", height=64, width=64, num_inference_steps=2, guidance_scale=5.0, seed=0)
        params = step_params(sd3, req)
        encoding = gw.create("encoding", sd3, params, priority=0)
        for node in sd3.nodes:
            if node.kind == "encode":
                encoding.nodes.started.add(node.id)  # published: on the consumers' backlog already
        gw.create("urgent", sd3, params, priority=9)
        return dict(gw.waiting_steps(0)), dict(gw.waiting_steps(9))

    normal, urgent = asyncio.run(scenario())
    assert normal[("denoise", "sd3-transformer")] == 2 and normal[("vae_decode", "sd3-vae")] == 2
    assert normal[("encode", "t5")] == 1  # only the urgent request's: the other's is published
    assert urgent == {
        ("encode", "clip-l"): 1,
        ("encode", "clip-g"): 1,
        ("encode", "t5"): 1,
        ("denoise", "sd3-transformer"): 1,
        ("vae_decode", "sd3-vae"): 1,
    }
