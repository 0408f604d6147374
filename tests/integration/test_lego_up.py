"""`lego up` starts everything, restarts a service that dies, and Ctrl-C (SIGINT) stops
everything: no process left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from lego.launcher import free_port


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


def test_lego_up_serves_then_sigint_stops_every_child(model_cache, tmp_path):
    port = free_port()
    state_dir = tmp_path / "state"
    env = {
        **os.environ,
        "LEGO_MODEL_CACHE_DIR": str(model_cache),
        "HF_HUB_OFFLINE": "1",
        "LEGO_STATE_DIR": str(state_dir),
    }
    log = open(tmp_path / "up.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lego.cli", "up", "--port", str(port), "--workflows", "sd3"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        give_up = time.monotonic() + 300
        while time.monotonic() < give_up:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("lego up never became ready:\n" + (tmp_path / "up.log").read_text()[-3000:])
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
        children = _children(proc.pid)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        give_up = time.monotonic() + 30
        while time.monotonic() < give_up and any(_alive(c) for c in children):
            time.sleep(0.1)
        assert not [c for c in children if _alive(c)], "children survived Ctrl-C"
        printed = (tmp_path / "up.log").read_text()
        assert "ready: gateway on" in printed
        assert printed.count(key_file.read_text().strip()) == 1, "the first start shows the admin key once"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for child in _children(proc.pid):
            os.killpg(child, signal.SIGKILL)
        log.close()
