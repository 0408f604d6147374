"""A NATS cluster on this machine: N nats-server processes joined by routes, JetStream on each.

Why: streams and buckets with `LEGO_STREAM_REPLICAS=3` need three JetStream servers, and the
only way to know that the mesh survives losing one is to run three and kill one. The fault
tests start it, and `lego up --nats-servers 3` (through the launcher's `Mesh`). Each server is
a `Child` in its own process group with fixed ports and its own store directory, so
`restart(i)` brings the same server back (same name, ports and data), as a supervisor would.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from lego.processes import Child, free_port, nats_server_binary, wait_accepting, wait_gone

CLUSTER_NAME = "lego"
CLUSTER_READY_TIMEOUT_S = 60.0  # three servers electing a JetStream meta leader on a busy box


@dataclass
class ClusterNode:
    child: Child
    port: int  # clients
    monitor_port: int  # /healthz: JetStream current (a meta leader known)
    scheme: str = "nats"  # "tls" when its config serves TLS

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"


class NatsCluster:
    """`size` nats-servers with JetStream, routed to each other; `url` lists every server
    (comma-separated, as LEGO_NATS_URL takes it), so a client fails over to a survivor.
    `config`: a config file every server reads (the locked bus's users and permissions, TLS for
    clients: lego.bus_lock); `tls`: that config serves TLS, so the URLs are `tls://`."""

    def __init__(
        self, workdir: Path, size: int = 3, log_dir: Path | None = None, config: Path | None = None, tls: bool = False
    ) -> None:
        self.workdir = workdir
        self.log_dir = log_dir or workdir
        route_ports = [free_port() for _ in range(size)]
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in route_ports)
        self.nodes: list[ClusterNode] = []
        for i, route_port in enumerate(route_ports):
            port, monitor = free_port(), free_port()
            argv = [
                nats_server_binary(),
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                str(port),
                "-m",
                str(monitor),
                "-n",
                f"nats-{i}",
                "-sd",
                str(workdir / f"nats-{i}"),
                "--cluster_name",
                CLUSTER_NAME,
                "--cluster",
                f"nats://127.0.0.1:{route_port}",
                "--routes",
                routes,
            ]
            if config is not None:  # the flags above win over the file's settings
                argv += ["-c", str(config)]
            child = Child(f"nats-{i}", argv, {}, self.log_dir / f"nats-{i}.log")
            self.nodes.append(ClusterNode(child, port, monitor, "tls" if tls else "nats"))

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def start(self, timeout_s: float = CLUSTER_READY_TIMEOUT_S) -> None:
        """Start every server; return once each accepts clients and JetStream has a meta leader."""
        try:
            for node in self.nodes:
                node.child.start()
            for node in self.nodes:
                self.wait_ready(node, timeout_s)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, node: ClusterNode, timeout_s: float = CLUSTER_READY_TIMEOUT_S) -> None:
        """Until `node` accepts clients, has a route to every other server (on a loaded box
        routes form a while after JetStream answers) and its /healthz says JetStream is current."""
        wait_accepting(node.child, node.port)
        give_up = time.monotonic() + timeout_s
        others = {other.child.name for other in self.nodes if other is not node}
        last = ""
        while time.monotonic() < give_up:
            try:
                base = f"http://127.0.0.1:{node.monitor_port}"
                routed = {r["remote_name"] for r in httpx.get(f"{base}/routez", timeout=2).json().get("routes") or []}
                r = httpx.get(f"{base}/healthz", timeout=2)
                if r.status_code == 200 and others <= routed:
                    return
                last = r.text if r.status_code != 200 else f"routed to {sorted(routed)} of {sorted(others)}"
            except (httpx.HTTPError, ValueError) as exc:
                last = str(exc)
            time.sleep(0.1)
        raise TimeoutError(f"{node.child.name}: not routed and current within {timeout_s:.0f}s ({last})")

    def kill(self, i: int) -> None:
        """kill -9 server `i` (and wait until it is gone): a crash, not a shutdown."""
        self.nodes[i].child.signal_group(signal.SIGKILL)
        wait_gone([self.nodes[i].child], 10)

    def restart(self, i: int) -> None:
        """Start server `i` again (same ports, name and store) and wait until it is current."""
        self.nodes[i].child.start()
        self.wait_ready(self.nodes[i])

    def stop(self) -> None:
        """SIGTERM every server, then SIGKILL what is left."""
        children = [node.child for node in self.nodes]
        for child in children:
            child.signal_group(signal.SIGTERM)
        wait_gone(children, 10)
        for child in children:
            child.signal_group(signal.SIGKILL)
        wait_gone(children, 5)
