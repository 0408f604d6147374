"""Gateways' shared state on a real nats-server: a record is claimed once, a dead gateway's
leases are adopted by exactly one survivor, an Idempotency-Key names one request and body."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.errors import APIError
from services.gateway.idempotency import IdempotencyKeys, body_hash
from services.gateway.leases import Leases
from services.gateway.records import RequestRecord, RequestStore
from services.gateway.request_state import Owner, RunStatus
from shared.bus import Bus
from shared.settings import Settings
from shared.workflows.catalogue import catalogue
from tests.waiting import wait_for_async


async def _bus(url: str, gateway_id: str) -> Bus:
    bus = Bus(Settings(nats_url=url, gateway_id=gateway_id, gateway_heartbeat_s=0.2), name=gateway_id)
    await bus.connect()
    return bus


def _record(request_id: str, gateway: str) -> RequestRecord:
    workflow = catalogue()["sd3"]
    return RequestRecord(
        request_id=request_id,
        run_id=f"run-{request_id}",
        workflow=workflow,
        params={n.id: {} for n in workflow.nodes},
        deadline=0.0,
        created=0.0,
        gateway=gateway,
    )


async def test_a_running_record_is_claimed_once_and_a_finished_one_replaced(nats_server: str) -> None:
    bus = await _bus(nats_server, "gw-a")
    try:
        store = RequestStore(bus)
        await store.start()
        assert await store.claim(_record("r1", "gw-a")) is None
        earlier = await store.claim(_record("r1", "gw-b"))
        assert earlier is not None and earlier.gateway == "gw-a"  # running: the second is refused
        await store.save(_record("r1", "gw-a").model_copy(update={"status": RunStatus.SUCCEEDED.value}))
        ended = await store.until_ended("_.r1", timeout_s=5)
        assert ended is not None and ended.status == "succeeded"
        assert await store.claim(_record("r1", "gw-b")) is None  # finished: the id may run again
        store.emit("run-r1", {"seq": 0, "type": "queued"})
        store.emit("run-r1", {"seq": 1, "type": "progress", "step": 1, "total": 2})
        events: list[dict] = []
        for _ in range(100):  # published without an ack: stored within moments
            events = await store.events("run-r1")
            if len(events) == 2:
                break
            await asyncio.sleep(0.1)
        assert [e["type"] for e in events] == ["queued", "progress"]
        await store.close()
    finally:
        await bus.close()


async def test_a_dead_gateways_leases_go_to_exactly_one_survivor(nats_server: str) -> None:
    buses = [await _bus(nats_server, name) for name in ("gw-dead", "gw-s1", "gw-s2")]
    adopted: dict[str, list[str]] = {"gw-s1": [], "gw-s2": []}

    def adopter(name: str):  # type: ignore[no-untyped-def]
        async def adopt(dead: str, keys: list[str]) -> None:
            assert dead == "gw-dead"
            adopted[name] += keys

        return adopt

    dead = Leases(buses[0], adopter("gw-dead"))
    survivors = [Leases(buses[1], adopter("gw-s1")), Leases(buses[2], adopter("gw-s2"))]
    try:
        await dead.start()
        for key in ("_.a", "_.b", "_.c"):
            await dead.hold(key)
        for s in survivors:
            await s.start()
        await asyncio.sleep(0.5)
        assert adopted == {"gw-s1": [], "gw-s2": []}  # alive: nobody adopts
        await dead.release_all()  # as a drain does (a kill -9 lets the heartbeat expire)

        await wait_for_async(
            "the leases to be adopted", lambda: len(adopted["gw-s1"]) + len(adopted["gw-s2"]) >= 3, timeout_s=10
        )
        await asyncio.sleep(0.5)  # more beats: nothing is adopted twice
        assert sorted(adopted["gw-s1"] + adopted["gw-s2"]) == ["_.a", "_.b", "_.c"]
    finally:
        for s in survivors:
            await s.close()
        for bus in buses:
            await bus.close()


async def test_an_idempotency_key_names_one_request_and_one_body(nats_server: str) -> None:
    bus = await _bus(nats_server, "gw-a")
    try:
        keys = IdempotencyKeys(bus)
        await keys.start()
        owner, other = Owner("k1", "alice"), Owner("k2", "bob")
        body, changed = body_hash('{"prompt": "a"}'), body_hash('{"prompt": "b"}')
        assert await keys.claim(owner, "key-1", body, "req-1") is None
        assert await keys.claim(owner, "key-1", body, "req-2") == "req-1"  # the retry: the first request
        assert await keys.claim(other, "key-1", body, "req-3") is None  # keys are per API key
        with pytest.raises(APIError) as refused:
            await keys.claim(owner, "key-1", changed, "req-4")
        assert refused.value.status == 422 and refused.value.code == "idempotency_key_reused"
        with pytest.raises(APIError) as bad:
            await keys.claim(owner, "has space", body, "req-5")
        assert bad.value.status == 400
        await keys.forget(owner, "key-1")
        assert await keys.claim(owner, "key-1", changed, "req-6") is None
    finally:
        await bus.close()
