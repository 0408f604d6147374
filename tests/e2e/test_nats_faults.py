"""The mesh under NATS faults, N asynchronous requests in flight (LEGO_FAULT_REQUESTS; CI runs a
few, `make faults` 200): none may be lost.

CI (`make test`) runs (a) with 10 requests; (b) needs a mesh of its own (about 30 s more on this
box, over the suite's budget), so it runs under `make faults` (which sets LEGO_FAULT_REQUESTS).

(a) A 3-server NATS cluster, every stream and bucket R3, the services connected to all three:
    kill -9 the server leading the step stream. (b) One nats-server with file storage: stop it
    and start it again on the same port and store. Each prints done / errors / lost /
    duplicated (tests/fault_load.py says what each means).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lego.launcher import Mesh
from lego.nats_cluster import NatsCluster
from lego.processes import wait_accepting, wait_gone
from shared import subjects
from tests.conftest import running_mesh
from tests.fault_load import fault_requests, requests_under_fault

FULL_SIZE_ONLY = pytest.mark.skipif(
    "LEGO_FAULT_REQUESTS" not in os.environ, reason="a mesh of its own: `make faults` runs it"
)
DOWN_S = 2.0  # how long the single server stays down: requests keep arriving at the gateway meanwhile


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    cluster = NatsCluster(tmp_path_factory.mktemp("nats-cluster"), size=3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
    assert not any(node.child.alive() for node in cluster.nodes), "a nats-server was left behind"


@pytest.fixture(scope="module")
def cluster_mesh(model_cache: Path, nats_cluster: NatsCluster, tmp_path_factory: pytest.TempPathFactory):
    yield from running_mesh(
        model_cache,
        tmp_path_factory.mktemp("cluster-mesh-logs"),
        workflows=["sd3"],
        nats_url=nats_cluster.url,
        LEGO_STREAM_REPLICAS="3",
    )


def _stream_leader(cluster: NatsCluster, stream: str) -> int:
    """The index of the server leading `stream`, as the cluster's monitoring says."""
    for node in cluster.nodes:
        if not node.child.alive():
            continue
        jsz = httpx.get(f"http://127.0.0.1:{node.monitor_port}/jsz", params={"streams": "true"}, timeout=5).json()
        for account in jsz.get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if detail["name"] == stream and detail.get("cluster", {}).get("leader"):
                    return int(detail["cluster"]["leader"].removeprefix("nats-"))
    raise AssertionError(f"no server leads stream {stream}")


def test_every_stream_and_bucket_is_replicated_on_three_servers(nats_cluster: NatsCluster, cluster_mesh: Mesh) -> None:
    # The KV buckets are streams named KV_<bucket>: presence, LoRAs, API keys alike.
    node = nats_cluster.nodes[0]
    jsz = httpx.get(f"http://127.0.0.1:{node.monitor_port}/jsz", params={"streams": "true", "config": "true"}).json()
    streams = {d["name"]: d["config"]["num_replicas"] for a in jsz["account_details"] for d in a["stream_detail"]}
    assert subjects.STEP_STREAM in streams and subjects.RESULT_STREAM in streams
    assert any(name.startswith("KV_") for name in streams), streams
    assert all(r == 3 for r in streams.values()), streams


def test_killing_a_cluster_server_loses_no_request(nats_cluster: NatsCluster, cluster_mesh: Mesh) -> None:
    n = fault_requests()
    victim = _stream_leader(nats_cluster, subjects.STEP_STREAM)
    counts = requests_under_fault(cluster_mesh.url, n, lambda: nats_cluster.kill(victim), tag="cluster-kill")
    print(counts.line(f"kill -9 nats-{victim} (step stream leader) of 3"))
    assert counts.lost == 0, counts
    assert counts.errors == 0, counts
    assert counts.done == n


@pytest.fixture(scope="module")
def single_nats_mesh(model_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    yield from running_mesh(model_cache, tmp_path_factory.mktemp("single-nats-logs"), workflows=["sd3"])


def _restart(mesh: Mesh) -> None:
    """Stop the mesh's nats-server (SIGTERM), leave it down a moment, start it again (same port,
    same store) and wait until it accepts clients."""
    nats = mesh.nats
    assert nats is not None
    port = int(mesh.nats_url.rsplit(":", 1)[1])
    nats.signal_group(signal.SIGTERM)
    wait_gone([nats], 15)
    assert not nats.alive()
    time.sleep(DOWN_S)  # the fault itself: the server is down this long, not a wait for a condition
    nats.start()
    wait_accepting(nats, port)


@FULL_SIZE_ONLY
def test_restarting_the_single_server_loses_no_request(single_nats_mesh: Mesh) -> None:
    n = fault_requests()
    counts = requests_under_fault(single_nats_mesh.url, n, lambda: _restart(single_nats_mesh), tag="restart")
    print(counts.line("nats-server stopped and restarted (file storage)"))
    assert counts.lost == 0, counts
    assert counts.errors == 0, counts
    assert counts.done == n
