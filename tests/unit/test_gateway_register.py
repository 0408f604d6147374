"""A request whose lease cannot be taken (the bus electing a leader) is not left half-started:
the lease is tried again for a few seconds, and if the bus still does not answer, the request's
record and local state are undone, so a retry under the same Idempotency-Key runs it afresh
instead of waiting on a request no gateway drives (a CI run of the 3-NATS-server test hung so)."""

from __future__ import annotations

import asyncio
from typing import Any

import nats.js.errors
import pytest

from services.gateway.leases import Leases
from services.gateway.orchestrator import Orchestrator
from services.gateway.records import record_key
from services.gateway.request_state import Owner
from shared.settings import Settings
from shared.workflows.catalogue import catalogue
from shared.workflows.step_params import RequestParams, step_params


class FlakyKV:
    """A KV bucket whose first `failures` puts get no answer from the stream."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.puts: list[str] = []

    async def put(self, key: str, value: bytes) -> int:
        if self.failures > 0:
            self.failures -= 1
            raise nats.js.errors.NoStreamResponseError
        self.puts.append(key)
        return 1


def leases_over(kv: FlakyKV) -> Leases:
    leases = Leases.__new__(Leases)
    leases.gateway_id = "gw-1"
    leases._leases = kv  # type: ignore[assignment]
    return leases


def test_the_lease_is_tried_again_through_a_short_election_then_the_fault_is_raised() -> None:
    kv = FlakyKV(failures=2)
    asyncio.run(leases_over(kv).hold("k", within_s=5.0))
    assert kv.puts == ["k"]
    down = FlakyKV(failures=10**6)
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        asyncio.run(leases_over(down).hold("k", within_s=0.6))
    assert down.puts == []


class Store:
    def __init__(self) -> None:
        self.claimed: list[str] = []
        self.discarded: list[str] = []

    async def claim(self, record: Any) -> None:
        self.claimed.append(record.key)

    async def discard(self, key: str) -> None:
        self.discarded.append(key)


class DownLeases:
    released = False

    async def hold(self, key: str) -> None:
        raise nats.js.errors.NoStreamResponseError


def test_a_request_whose_lease_fails_is_undone_record_and_all() -> None:
    from services.gateway.records import AnswerSpec

    async def scenario() -> None:
        store = Store()
        gw = Orchestrator(None, None, Settings(), store=store, leases=DownLeases())  # type: ignore[arg-type]
        owner = Owner(key_id="k1")
        sd3 = catalogue()["sd3"]
        req = RequestParams(prompt="a boat", height=64, width=64, num_inference_steps=2, guidance_scale=5.0, seed=0)
        state = gw.create("req-1", sd3, step_params(sd3, req), owner=owner)
        assert gw.get("req-1", owner) is state
        with pytest.raises(nats.js.errors.NoStreamResponseError):
            await gw.register(state, AnswerSpec())
        key = record_key("k1", "req-1")
        assert store.claimed == [key] and store.discarded == [key]  # its record stored, then removed
        assert gw.get("req-1", owner) is None and state.run_id not in gw.runs  # nothing left to wait on
        again = gw.create("req-1", sd3, step_params(sd3, req), owner=owner)  # a retry creates it afresh
        assert again is not state

    asyncio.run(scenario())
