"""lego/balancer.py: the rotation and its health logic, then the proxy in this process against
small HTTP servers on free ports (one healthy, one draining, one gone)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest

from lego.balancer import STATUS_PATH, Backend, Balancer, Rotation, check_health, main, parse_address
from lego.launcher import free_port


def test_round_robin_over_the_healthy_then_the_rest() -> None:
    a, b, c = Backend("h", 1, healthy=True), Backend("h", 2, healthy=True), Backend("h", 3)
    rotation = Rotation([a, b, c])
    firsts = [rotation.order()[0] for _ in range(6)]
    assert firsts.count(a) == 3 and firsts.count(b) == 3, "new connections alternate between the healthy"
    assert all(order[-1] is c for order in (rotation.order() for _ in range(3))), "the unhealthy only as a last try"


def test_a_report_moves_a_backend_in_and_out() -> None:
    a, b = Backend("h", 1, healthy=True), Backend("h", 2, healthy=True)
    rotation = Rotation([a, b])
    assert rotation.report(a, False, "/healthz answered 503 Service Unavailable") is True
    assert rotation.report(a, False, "still draining") is False, "no change, nothing to log"
    assert [rotation.order()[0] for _ in range(4)] == [b] * 4
    assert rotation.report(a, True, "healthy") is True
    assert {rotation.order()[0] for _ in range(4)} == {a, b}
    status = rotation.status()["backends"]
    assert [s["address"] for s in status] == ["h:1", "h:2"] and all(s["healthy"] for s in status)


def test_with_none_healthy_every_backend_is_still_tried() -> None:
    a, b = Backend("h", 1), Backend("h", 2)
    assert set(Rotation([a, b]).order()) == {a, b}
    with pytest.raises(ValueError):
        Rotation([])


@pytest.mark.parametrize("bad", ["8000", ":8000", "host:", "host:port", "host:70000"])
def test_addresses_are_host_and_port(bad: str) -> None:
    assert parse_address("127.0.0.1:8000") == ("127.0.0.1", 8000)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address(bad)


def test_bad_flags_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--listen", "nowhere", "--backend", "127.0.0.1:1"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err


def test_lego_up_takes_a_number_of_gateways(capsys: pytest.CaptureFixture[str]) -> None:
    from lego.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["up"]).gateways == 1
    assert parser.parse_args(["up", "--gateways", "3"]).gateways == 3
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(["up", "--gateways", bad])
        assert "--gateways" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The proxy, in this process


class FakeGateway:
    """Answers /healthz with `health` and every other path with its own name, as a gateway would."""

    def __init__(self, name: str, health: int = 200) -> None:
        self.name, self.health, self.port = name, health, 0
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        path = request.split()[1].decode()
        status = self.health if path == "/healthz" else 200
        body = json.dumps({"gateway": self.name}).encode()
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        await writer.drain()
        writer.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


async def get(port: int, path: str = "/v1/workflows") -> tuple[int, dict]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@contextlib.asynccontextmanager
async def balancing(backends: list[Backend]) -> AsyncIterator[tuple[Balancer, int]]:
    balancer = Balancer(backends, interval_s=0.05)
    port, stop = free_port(), asyncio.Event()
    serving = asyncio.create_task(balancer.serve("127.0.0.1", port, stop))
    for _ in range(200):
        with contextlib.suppress(OSError):
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            break
        await asyncio.sleep(0.02)
    try:
        yield balancer, port
    finally:
        stop.set()
        await serving


async def test_health_checks_answer_why_not() -> None:
    healthy, draining = FakeGateway("a"), FakeGateway("b", health=503)
    await healthy.start()
    await draining.start()
    try:
        assert await check_health(Backend("127.0.0.1", healthy.port), None) is None
        assert "503" in (await check_health(Backend("127.0.0.1", draining.port), None) or "")
        assert "no answer" in (await check_health(Backend("127.0.0.1", free_port()), None) or "")
    finally:
        await healthy.stop()
        await draining.stop()


async def test_proxy_skips_draining_and_dead_gateways_and_says_when_none_is_left() -> None:
    a, b = FakeGateway("a"), FakeGateway("b")
    await a.start()
    await b.start()
    dead = free_port()  # nothing listens there: connections are refused
    backends = [Backend("127.0.0.1", a.port), Backend("127.0.0.1", b.port), Backend("127.0.0.1", dead)]
    async with balancing(backends) as (balancer, port):
        await balancer.check_once()
        answers = [await get(port) for _ in range(6)]
        assert {a[1]["gateway"] for a in answers} == {"a", "b"} and {a[0] for a in answers} == {200}

        b.health = 503  # b drains: out of rotation at the next check, a takes every connection
        await balancer.check_once()
        assert not backends[1].healthy and "503" in backends[1].reason
        assert {(await get(port))[1]["gateway"] for _ in range(4)} == {"a"}

        await a.stop()  # a dies between checks: its refusal sends the connection on (to b, draining)
        assert (await get(port))[1]["gateway"] == "b"
        assert not backends[0].healthy

        status, body = await get(port, STATUS_PATH)
        assert status == 200 and [s["healthy"] for s in body["backends"]] == [False, False, False]

        await b.stop()
        status, body = await get(port)
        assert status == 503 and body["error"]["code"] == "no_gateway"


async def test_a_stream_passes_through_as_it_is_written() -> None:
    """Server-sent events must reach the client when the gateway writes them, not when it is done."""
    more = asyncio.Event()

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        if request.startswith(b"GET /healthz"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
            writer.write(b"event: queued\r\ndata: {}\r\n\r\n")
            await writer.drain()
            await more.wait()  # the rest only once the client has seen the first event
            writer.write(b"event: result\r\ndata: {}\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(stream, "127.0.0.1", 0)
    backend = Backend("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        async with balancing([backend]) as (balancer, port):
            await balancer.check_once()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /v1/requests/r/events HTTP/1.1\r\nHost: x\r\n\r\n")
            seen = b""
            while b"event: queued" not in seen:
                chunk = await asyncio.wait_for(reader.read(1024), 10)
                assert chunk, f"the stream ended before its first event: {seen!r}"
                seen += chunk
            more.set()
            rest = await asyncio.wait_for(reader.read(), 10)
            assert b"event: result" in rest
            writer.close()
    finally:
        server.close()
