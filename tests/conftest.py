"""Shared fixtures: a per-session model cache, the reference pipeline, and `running_mesh`, which
starts a real mesh (nats-server + services + gateway as processes, free ports, temporary dirs).
The meshes the e2e tests share are in tests/e2e/conftest.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lego.launcher import Mesh, MeshConfig, free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ACK_WAIT_S = "4"  # short redelivery so the crash test does not wait 30 s


@pytest.fixture(scope="session", autouse=True)
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The secrets this run's meshes make (NATS passwords, admin keys): a temporary directory,
    never the state dir of the user running the tests."""
    path = tmp_path_factory.mktemp("state")
    os.environ["LEGO_STATE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny models are built once per test session into this directory."""
    path = Path(os.environ.get("LEGO_TEST_MODEL_CACHE", tmp_path_factory.mktemp("model-cache")))
    os.environ["LEGO_MODEL_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def settings(model_cache: Path):
    from shared.settings import Settings

    return Settings.from_env(model_cache_dir=str(model_cache))


@pytest.fixture(scope="session")
def reference_pipeline(settings):
    """diffusers' own StableDiffusion3Pipeline over the same zoo components: the oracle."""
    from baseline.pipelines import build_reference_pipeline

    return build_reference_pipeline(settings)


def running_mesh(
    model_cache: Path,
    log_dir: Path,
    replicas: dict[str, int] | None = None,
    workflows: list[str] | None = None,
    auth: bool = False,
    nats_url: str | None = None,
    **env: str,
) -> Iterator[Mesh]:
    """Start a mesh as a user's `lego up` would (free port, own nats-server), stop it after.
    `workflows` limits it to the processes those workflows need (default: the whole catalogue).
    The shared meshes run without API keys (as `lego up --no-auth`); `auth=True` locks the
    gateway (pass LEGO_STATE_DIR in `env`: the admin key file is made there). `nats_url`: run on
    that NATS (e.g. a cluster's servers) instead of a nats-server of its own."""
    m = Mesh(
        MeshConfig(
            port=free_port(),
            nats_url=nats_url,
            workflows=workflows,
            replicas=replicas or {},
            env={
                "LEGO_MODEL_CACHE_DIR": str(model_cache),
                "LEGO_ACK_WAIT_S": ACK_WAIT_S,
                "HF_HUB_OFFLINE": "1",
                **env,
            },
            auth=auth,
            log_dir=log_dir,
            quiet=True,
        )
    )
    try:
        m.start(ready_timeout_s=300)
    except BaseException:
        _dump_logs(log_dir)
        raise
    try:
        yield m
    finally:  # also when the generator is closed early (a fixture that failed before stopping it)
        m.stop()
    leftover = [c.name for c in m.children if c.alive()]
    assert not leftover, f"processes left behind: {leftover}"


def _dump_logs(log_dir: Path) -> None:
    for path in sorted(log_dir.glob("*.log")):
        print(f"----- {path.name} -----\n{path.read_text()[-4000:]}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failing test that used the mesh, print the tail of every service log."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed and "mesh" in item.fixturenames:
        m = item.funcargs.get("mesh")
        if m is not None and m.config.log_dir:
            _dump_logs(m.config.log_dir)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[str]:
    """A private nats-server with JetStream on a free port, for bus-level tests."""
    import signal
    import socket
    import subprocess
    import time

    from lego.launcher import nats_server_binary

    port = free_port()
    proc = subprocess.Popen(
        [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path / "js")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        give_up = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < give_up, "nats-server did not start"
                time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
