"""The local balancer of `lego up --gateways N`: one public port, N gateway processes behind it.

Why our own and not HAProxy here: `lego up` must work on a fresh machine with nothing installed
by hand, and HAProxy comes from the system's packages (root, a daemon). Compose and k8s use the
real thing (deploy/haproxy.cfg, a Service); this one does only what a local run needs:

- TCP round robin, a new backend per client connection: bytes are copied as they arrive, so the
  progress streams (SSE) pass through unbuffered, and HTTPS passes through untouched.
- Active health checks: every `interval_s`, `GET /healthz` on each gateway; anything but 200
  (a draining gateway answers 503) or no answer takes it out of rotation, 200 puts it back.
- A gateway that refuses a connection is taken out at once and the connection is tried on the
  next one: nothing was sent yet, so that retry is safe even for a POST.
- Nothing reachable: 503 with a JSON reason (the gateway's error shape), never a hang.
- `GET /balancer/status` from this machine answers the backends and their state (`lego status`).

Run: `python -m lego.balancer --listen 127.0.0.1:8000 --backend 127.0.0.1:8101 --backend ...`
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import signal
import ssl
import sys
import time
from dataclasses import dataclass, field

STATUS_PATH = "/balancer/status"
HEALTH_PATH = "/healthz"
CONNECT_TIMEOUT_S = 2.0
CHECK_TIMEOUT_S = 2.0
FIRST_CHUNK_TIMEOUT_S = 30.0
CHUNK = 65536


@dataclass(eq=False)
class Backend:
    """One gateway: where it listens, and what the balancer knows of it (compared by identity:
    its state changes)."""

    host: str
    port: int
    healthy: bool = False
    reason: str = "not checked yet"
    since: float = field(default_factory=time.time)  # when `healthy` last changed
    active: int = 0  # client connections open to it now
    served: int = 0  # client connections it took

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def as_dict(self) -> dict[str, object]:
        return {
            "address": self.address,
            "healthy": self.healthy,
            "reason": self.reason,
            "since": self.since,
            "active": self.active,
            "served": self.served,
        }


class Rotation:
    """Which backend a new connection tries first, second...: the healthy ones in round robin,
    then the others (a check may lag behind a gateway that just came back; trying it beats a 503)."""

    def __init__(self, backends: list[Backend]) -> None:
        if not backends:
            raise ValueError("a balancer needs at least one backend")
        self.backends = backends
        self._next = 0

    def order(self) -> list[Backend]:
        self._next += 1

        def turn(group: list[Backend]) -> list[Backend]:
            start = self._next % len(group) if group else 0
            return group[start:] + group[:start]

        return turn([b for b in self.backends if b.healthy]) + turn([b for b in self.backends if not b.healthy])

    def report(self, backend: Backend, healthy: bool, reason: str) -> bool:
        """Record a check's or a connection's outcome; True when it moved the backend in or out."""
        changed = backend.healthy != healthy
        backend.reason = reason
        if changed:
            backend.healthy = healthy
            backend.since = time.time()
        return changed

    def status(self) -> dict[str, object]:
        return {"backends": [b.as_dict() for b in self.backends]}


def parse_address(value: str) -> tuple[str, int]:
    """`host:port` -> (host, port); raises ValueError with the reason."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r}: use HOST:PORT")
    return host.strip("[]"), int(port)


async def check_health(backend: Backend, tls: ssl.SSLContext | None, timeout_s: float = CHECK_TIMEOUT_S) -> str | None:
    """None when `GET /healthz` answers 200; else why not (the status line, or the error)."""
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(backend.host, backend.port, ssl=tls)
            writer.write(f"GET {HEALTH_PATH} HTTP/1.1\r\nHost: {backend.address}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            line = (await reader.readline()).decode("latin-1").strip()
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        return f"no answer: {type(exc).__name__} {exc}".strip()
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
    parts = line.split()
    if len(parts) >= 2 and parts[1] == "200":
        return None
    return f"{HEALTH_PATH} answered {' '.join(parts[1:]) or 'nothing'}"


def _from_this_machine(writer: asyncio.StreamWriter) -> bool:
    peer = writer.get_extra_info("peername")
    try:
        return bool(peer) and ipaddress.ip_address(peer[0]).is_loopback
    except ValueError:
        return False


def _http_answer(status: str, body: dict[str, object]) -> bytes:
    data = json.dumps(body).encode()
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    return (head + "Connection: close\r\n\r\n").encode() + data


NO_BACKEND = {
    "error": {
        "code": "no_gateway",
        "message": "no gateway behind the balancer accepts connections; try again shortly",
    }
}


class Balancer:
    """The proxy: accept, pick a backend, copy bytes both ways; check the backends meanwhile."""

    def __init__(self, backends: list[Backend], interval_s: float = 0.5, tls: bool = False) -> None:
        self.rotation = Rotation(backends)
        self.interval_s = interval_s
        # The gateways' own HTTPS (lego up --tls-cert): their certificate names a public host,
        # not 127.0.0.1, and the checks only ask our own children whether they are up.
        self.tls: ssl.SSLContext | None = None
        if tls:
            self.tls = ssl.create_default_context()
            self.tls.check_hostname = False
            self.tls.verify_mode = ssl.CERT_NONE

    def _say(self, message: str) -> None:
        print(f"lego-balancer: {message}", file=sys.stderr, flush=True)

    def _report(self, backend: Backend, healthy: bool, reason: str) -> None:
        if self.rotation.report(backend, healthy, reason):
            state = "in rotation" if healthy else f"out of rotation ({reason})"
            self._say(f"gateway {backend.address} {state}")

    async def check_once(self) -> None:
        results = await asyncio.gather(*(check_health(b, self.tls) for b in self.rotation.backends))
        for backend, why_not in zip(self.rotation.backends, results, strict=True):
            self._report(backend, why_not is None, why_not or "healthy")

    async def check_forever(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self.interval_s)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._handle(reader, writer)
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The client speaks first (HTTP, or TLS's hello): read that before choosing, so a
        # backend that refuses can be passed over with nothing lost.
        async with asyncio.timeout(FIRST_CHUNK_TIMEOUT_S):
            first = await reader.read(CHUNK)
        if not first:
            return
        if first.startswith(f"GET {STATUS_PATH} ".encode()) and _from_this_machine(writer):
            writer.write(_http_answer("200 OK", self.rotation.status()))
            await writer.drain()
            return
        for backend in self.rotation.order():
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    up_reader, up_writer = await asyncio.open_connection(backend.host, backend.port)
            except (OSError, TimeoutError) as exc:
                self._report(backend, False, f"refused a connection: {type(exc).__name__}")
                continue
            backend.active += 1
            backend.served += 1
            try:
                up_writer.write(first)
                await self._pipe(reader, writer, up_reader, up_writer)
            finally:
                backend.active -= 1
            return
        if first[:1] != b"\x16":  # plain HTTP: say why; a TLS client would not read it
            writer.write(_http_answer("503 Service Unavailable", NO_BACKEND))
            await writer.drain()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        """Copy both ways until one side closes; then close the other."""

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(CHUNK):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError, RuntimeError):
                    if dst.can_write_eof():
                        dst.write_eof()

        to_backend = asyncio.create_task(copy(reader, up_writer))
        to_client = asyncio.create_task(copy(up_reader, writer))
        try:
            # The answer ending (or the backend dying) ends the connection; a client that
            # half-closes its side still gets the rest of the answer.
            await to_client
        finally:
            to_backend.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await to_backend
            up_writer.close()
            with contextlib.suppress(OSError):
                await up_writer.wait_closed()

    async def serve(self, host: str, port: int, stop: asyncio.Event) -> None:
        server = await asyncio.start_server(self.handle, host, port, reuse_address=True)
        backends = ", ".join(b.address for b in self.rotation.backends)
        self._say(f"listening on {host}:{port}; gateways {backends}")
        checks = asyncio.create_task(self.check_forever())
        try:
            await stop.wait()
        finally:
            # Not server.wait_closed(): it would wait for every open stream to end. The
            # connections still open are cut when the event loop ends.
            server.close()
            checks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lego.balancer", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT the clients connect to")
    parser.add_argument("--backend", action="append", required=True, help="a gateway's HOST:PORT (repeat it)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between health checks (%(default)s)")
    parser.add_argument("--tls", action="store_true", help="the gateways serve HTTPS: check /healthz over it")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        host, port = parse_address(args.listen)
        backends = [Backend(*parse_address(b)) for b in args.backend]
    except ValueError as exc:
        print(f"lego-balancer: {exc}", file=sys.stderr)
        return 2
    balancer = Balancer(backends, args.interval, args.tls)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await balancer.serve(host, port, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
