"""The read-loop handoff (shared/nats_handoff.py) on a real nats-server: requests and inbox
messages arrive through it on the pinned nats-py (a silent fall back to nats.py's slower path
would show here), and a handler that raises loses its own message only."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.msg import Msg

from shared import nats_handoff
from shared.bus import Bus
from shared.settings import Settings

pytestmark = pytest.mark.asyncio(loop_scope="function")


async def test_requests_and_inboxes_are_handed_over_in_the_read_loop(nats_server):
    bus = Bus(Settings.from_env(nats_url=nats_server), "test")
    await bus.connect()
    try:
        nc = bus.nc
        mux = [s for s in nc._subs.values() if s.subject.endswith(".*")]
        assert len(mux) == 1 and mux[0]._wait_for_msgs_task is None, "the request mux kept its task"

        async def echo(msg: Msg) -> None:
            await msg.respond(msg.data[::-1])

        await nc.subscribe("handoff.echo", cb=echo)
        replies = await asyncio.gather(*(nc.request("handoff.echo", f"m{i}".encode(), timeout=10) for i in range(20)))
        assert [r.data for r in replies] == [f"m{i}".encode()[::-1] for i in range(20)]

        got: list[bytes] = []
        seen = asyncio.Event()

        def deliver(msg: Msg) -> None:
            if msg.data == b"bad":
                raise ValueError("a handler bug")
            got.append(msg.data)
            if len(got) == 2:
                seen.set()

        sub = await nats_handoff.subscribe(nc, "handoff.inbox", deliver)
        assert sub._wait_for_msgs_task is None  # no task of its own
        for data in (b"one", b"bad", b"two"):
            await nc.publish("handoff.inbox", data)
        await asyncio.wait_for(seen.wait(), 10)
        assert got == [b"one", b"two"]
        assert sub._pending_size == 0  # nothing counted as pending: no slow-consumer drops later
        await sub.unsubscribe()
    finally:
        await bus.close()
