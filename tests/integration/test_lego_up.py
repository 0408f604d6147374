"""`lego up` starts everything, restarts a service that dies, and Ctrl-C (SIGINT) stops
everything: no process left behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from lego.launcher import free_port
from tests.waiting import wait_for


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _up(model_cache: Path, tmp_path: Path, *flags: str) -> tuple[subprocess.Popen, int]:
    """`lego up --workflows sd3 FLAGS` on a free port, its own state dir, its output in up.log;
    returns once its gateway is ready."""
    port = free_port()
    env = {
        **os.environ,
        "LEGO_MODEL_CACHE_DIR": str(model_cache),
        "HF_HUB_OFFLINE": "1",
        "LEGO_STATE_DIR": str(tmp_path / "state"),
    }
    with open(tmp_path / "up.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lego.cli", "up", "--port", str(port), "--workflows", "sd3", *flags],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    give_up = time.monotonic() + 300
    while time.monotonic() < give_up:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    _kill(proc)
    raise AssertionError("lego up never became ready:\n" + (tmp_path / "up.log").read_text()[-3000:])


def _kill(proc: subprocess.Popen) -> None:
    """What a failed test leaves: `lego up` and every child's group, SIGKILLed."""
    if proc.poll() is not None:
        return
    for child in _children(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _sigint_stops_every_child(proc: subprocess.Popen) -> None:
    """Ctrl-C: `lego up` exits 0 and leaves no child alive."""
    children = _children(proc.pid)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    give_up = time.monotonic() + 30
    while time.monotonic() < give_up and any(_alive(c) for c in children):
        time.sleep(0.1)
    assert not [c for c in children if _alive(c)], "children survived Ctrl-C"


def _admin(tmp_path: Path) -> dict[str, str]:
    return {"Authorization": f"Bearer {(tmp_path / 'state' / 'admin.key').read_text().strip()}"}


def _log(tmp_path: Path) -> str:
    return (tmp_path / "up.log").read_text()


def _routed(monitor: int) -> set[str]:
    """The servers a nats-server (its monitoring port) has routes to, by name, once JetStream is current."""
    try:
        if httpx.get(f"http://127.0.0.1:{monitor}/healthz", timeout=5).status_code != 200:
            return set()
        routes = httpx.get(f"http://127.0.0.1:{monitor}/routez", timeout=5).json()
    except httpx.HTTPError:
        return set()
    return {r["remote_name"] for r in routes["routes"]}


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_lego_up_serves_then_sigint_stops_every_child(model_cache, tmp_path):
    proc, port = _up(model_cache, tmp_path)
    state_dir = tmp_path / "state"
    try:
        children = _children(proc.pid)
        assert len(children) >= 5, f"expected nats + 3 services + gateway, found {children}"
        # The first start made the admin key (0600 in the state dir); a request needs it.
        key_file = state_dir / "admin.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        admin = {"Authorization": f"Bearer {key_file.read_text().strip()}"}
        body = {"prompt": "a boat", "size": "64x64", "num_inference_steps": 2}
        url = f"http://127.0.0.1:{port}/v1/images/generations"
        assert httpx.post(url, json=body, timeout=30).status_code == 401
        r = httpx.post(url, json=body, headers=admin, timeout=120)
        assert r.status_code == 200, r.text
        # A service that dies is started again by `lego up`, and the mesh serves on.
        vae = next(c for c in children if b"services.vae" in Path(f"/proc/{c}/cmdline").read_bytes())
        os.kill(vae, signal.SIGKILL)
        give_up = time.monotonic() + 120
        while time.monotonic() < give_up and b"restarted it" not in (tmp_path / "up.log").read_bytes():
            time.sleep(0.2)
        assert b"vae-0 exited unexpectedly; restarted it" in (tmp_path / "up.log").read_bytes()
        r = httpx.post(url, json={**body, "prompt": "a boat again"}, headers=admin, timeout=120)
        assert r.status_code == 200, r.text
        _sigint_stops_every_child(proc)
        printed = (tmp_path / "up.log").read_text()
        assert "ready: gateway on" in printed
        assert printed.count(key_file.read_text().strip()) == 1, "the first start shows the admin key once"
    finally:
        _kill(proc)


def test_lego_up_with_three_nats_servers_runs_a_routed_r3_cluster_and_stops_it(model_cache, tmp_path):
    proc, port = _up(model_cache, tmp_path, "--nats-servers", "3", "--no-autoscale")
    try:
        servers = [c for c in _children(proc.pid) if _cmdline(c)[0].endswith("nats-server")]
        assert len(servers) == 3, f"expected 3 nats-servers, found {[_cmdline(c) for c in servers]}"
        argvs = [_cmdline(c) for c in servers]
        names = [argv[argv.index("-n") + 1] for argv in argvs]
        monitors = [int(argv[argv.index("-m") + 1]) for argv in argvs]
        for name, monitor in zip(names, monitors, strict=True):  # each routed to the other two (and current)
            wait_for(
                f"{name} routed and current", lambda m=monitor, n=name: _routed(m) == set(names) - {n}, timeout_s=60
            )
        jsz = httpx.get(f"http://127.0.0.1:{monitors[0]}/jsz", params={"streams": "true", "config": "true"}).json()
        copies = {d["name"]: d["config"]["num_replicas"] for a in jsz["account_details"] for d in a["stream_detail"]}
        assert copies and all(n == 3 for n in copies.values()), copies  # every stream and bucket R3
        body = {"prompt": "a boat", "size": "64x64", "num_inference_steps": 2}
        url = f"http://127.0.0.1:{port}/v1/images/generations"
        r = httpx.post(url, json=body, headers=_admin(tmp_path), timeout=120)
        assert r.status_code == 200 and len(r.json()["data"]) == 1, r.text
        key = _admin(tmp_path)["Authorization"].removeprefix("Bearer ")
        status = subprocess.run(
            [sys.executable, "-m", "lego.cli", "status", "--url", f"http://127.0.0.1:{port}", "--api-key", key],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        assert "nats: cluster lego, 3 servers; step stream R3, leader nats-" in status.stdout, status.stdout
        # A server that dies is started again (same name, ports, store) and rejoins the other two.
        os.kill(servers[1], signal.SIGKILL)
        wait_for(f"{names[1]} to be restarted", lambda: f"{names[1]} exited unexpectedly" in _log(tmp_path))
        wait_for(f"{names[1]} to rejoin", lambda: _routed(monitors[1]) == set(names) - {names[1]}, timeout_s=60)
        wait_for("every server current", lambda: all(_routed(m) for m in monitors), timeout_s=60)
        # As a client does: a 503 (the bus electing a stream's leader) is retried, under one key.
        again = {**_admin(tmp_path), "Idempotency-Key": "a-boat-again"}
        give_up = time.monotonic() + 90  # a stream's new leader: seconds, more on a loaded box
        while True:
            r = httpx.post(url, json={**body, "prompt": "a boat again"}, headers=again, timeout=120)
            if r.status_code != 503 or time.monotonic() > give_up:
                break
            time.sleep(float(r.headers.get("retry-after", "1")))
        assert r.status_code == 200, r.text
        servers = [c for c in _children(proc.pid) if _cmdline(c)[0].endswith("nats-server")]  # the new one too
        _sigint_stops_every_child(proc)
        assert not [c for c in servers if _alive(c)], "a nats-server survived Ctrl-C"
        assert "3 routed nats-servers" in _log(tmp_path)
    finally:
        _kill(proc)
