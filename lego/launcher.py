"""Starts and stops the whole mesh on one machine: nats-server (or a routed cluster of them),
the model services, the gateway.

Each child runs in its own process group (`lego.processes`) so that stopping the mesh stops
everything a child started too. Which processes run is the unit plan (`lego.units`). Used by
`lego up` and by the tests (which need exactly the same mesh).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from lego.bus_lock import BusLock, prepare_bus
from lego.devices import DevicePlan
from lego.keys import admin_key_path
from lego.nats_cluster import NatsCluster

# Re-exported: `lego.cli`, the tests and the benchmarks import these from here.
from lego.processes import SHARED_CORES_ENV, Child, free_port, nats_server_binary, start_nats_server, wait_gone
from lego.units import GROUPED_SERVICE, SERVICES, Unit, check_groups, plan_units
from services.autoscaler.placement import MIN_SHARE
from shared import bus_roles

__all__ = [
    "GATEWAY_DRAIN_S",
    "RETIRE_GRACE_S",
    "SERVICES",
    "SHARED_CORES_ENV",
    "STOP_GRACE_S",
    "Child",
    "Mesh",
    "MeshConfig",
    "Unit",
    "free_port",
    "nats_server_binary",
    "plan_units",
]

STOP_GRACE_S = 15.0
# A gateway told to stop drains first (stops taking requests, hands its leases to the others,
# exits): stop() gives the gateways this long before the replicas they wait on are stopped.
GATEWAY_DRAIN_S = 30.0
RETIRE_GRACE_S = 120.0  # a replica told to stop may finish its step this long before SIGKILL


@dataclass
class MeshConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # Gateway processes (`lego up --gateways N`): one serves `port` itself; more listen on free
    # ports behind a local balancer (lego/balancer.py) on `port`.
    gateways: int = 1
    nats_url: str | None = None  # None: start our own nats-server
    # Our own NATS (`lego up --nats-servers N`): 1 nats-server, or N routed into a cluster
    # (lego/nats_cluster.py), every stream and bucket then R<N> (LEGO_STREAM_REPLICAS, unless
    # `env` names it) and every child given the servers' list, so it fails over to a survivor.
    nats_servers: int = 1
    workflows: list[str] | None = None  # None: every workflow of the catalogue
    replicas: dict[str, int] = field(default_factory=dict)  # unit name -> replicas (default 1)
    # Denoiser unit -> devices per replica (1, 2 or 4; `lego up --group`): each of its replicas is
    # a group that starts its own k-1 workers (services/denoiser/group/); a unit not named here
    # keeps the environment's LEGO_DENOISE_GROUP_SIZE (default 1).
    groups: dict[str, int] = field(default_factory=dict)
    parallel_mode: str | None = None  # the denoisers' LEGO_PARALLEL_MODE; None: the environment's
    env: dict[str, str] = field(default_factory=dict)  # extra LEGO_* settings for every child
    log_dir: Path | None = None  # None: children write to this terminal
    quiet: bool = False
    # Scale each unit on its backlog (services/autoscaler, local actuator, in a thread of this
    # process); its settings are the LEGO_AUTOSCALE_* of `env` and the environment.
    autoscale: bool = False
    # API keys on the gateway: the admin key lives in <state_dir>/admin.key (made at the first
    # start); False runs the gateway open to anyone who reaches it (`lego up --no-auth`).
    auth: bool = True
    # Our own nats-server runs locked (a user per role, shared.bus_roles; passwords under the
    # state dir); off: an open bus, as before. An external `nats_url` is the user's to lock:
    # the children get the LEGO_NATS_USER / LEGO_NATS_PASSWORD_FILE of the environment.
    lock_bus: bool = True
    nats_tls: bool = False  # our own nats-server serves TLS (a CA made in the state dir)
    # GPUs cuda:0..gpus-1 to place replicas over (`lego up --gpus N`, lego/devices.py); 0 or 1:
    # every replica runs on the device LEGO_DEVICE names, as before
    gpus: int = 0


class Mesh:
    """The running mesh. `start()` returns once the gateway reports ready.

    What a subclass may change (another system run the same way on this machine):
    `plan()` (which units), `replica_command()` (what a replica runs) and `start_front()`
    (what starts after the replicas and says when all is ready)."""

    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.children: list[Child] = []
        self.nats: Child | None = None  # our own single nats-server ...
        self.nats_cluster: NatsCluster | None = None  # ... or cluster (`MeshConfig.nats_servers` > 1)
        self.gateways: list[Child] = []  # every gateway process, drained first on stop()
        self.gateway_ports: dict[str, int] = {}  # gateway name -> the port it listens on
        self.front_urls: list[str] = []  # what wait_ready asks: the mesh's gateways and balancer
        self.workdir = Path(tempfile.mkdtemp(prefix="lego-mesh-"))
        self.nats_url = config.nats_url or ""
        self.units: dict[str, Unit] = {}
        self.autoscaler: Any = None  # services.autoscaler.controller.AutoscalerThread when autoscaling
        self.bus_lock: BusLock | None = None  # set when our own nats-server is locked
        self._lock = threading.RLock()  # children change from the autoscaler's thread too
        self.devices = DevicePlan(config.gpus) if config.gpus > 1 else None  # which GPU a replica runs on
        self.admin_key_file: Path | None = None  # with auth: the admin key's file ...
        self.admin_key_made = False  # ... and whether this start made it (a first start)

    @property
    def url(self) -> str:
        scheme = "https" if self._env("").get("LEGO_GATEWAY_TLS_CERT") else "http"
        return f"{scheme}://{self.config.host}:{self.config.port}"

    def _say(self, message: str) -> None:
        if not self.config.quiet:
            print(f"lego: {message}", file=sys.stderr, flush=True)

    def _log_path(self, name: str) -> Path | None:
        return self.config.log_dir / f"{name}.log" if self.config.log_dir else None

    def _env(self, role: str = bus_roles.ADMIN) -> dict[str, str]:
        """A child's environment; on our locked bus, with the credentials of `role` ("": none)."""
        env = dict(os.environ)
        env.update(self.config.env)
        env["LEGO_NATS_URL"] = self.nats_url
        if self.config.nats_servers > 1 and "LEGO_STREAM_REPLICAS" not in self.config.env:
            env["LEGO_STREAM_REPLICAS"] = str(self.config.nats_servers)  # a copy on each server
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.bus_lock is not None:
            env.update(self.bus_lock.env(role))
        return env

    def bus_role(self, unit: Unit) -> str:
        """The bus role a replica of `unit` connects as: its service's; a process outside the
        role table (a subclass's own kind of replica) is admin."""
        return unit.service if unit.service in bus_roles.SERVICE_KINDS else bus_roles.ADMIN

    def plan(self) -> list[Unit]:
        """The units this mesh runs."""
        return plan_units(self.config.workflows)

    def replica_command(self, unit: Unit) -> list[str]:
        """The command line of one replica of `unit`."""
        return [sys.executable, "-m", f"services.{unit.service}", "--models", ",".join(unit.models)]

    def unit_env(self, unit: Unit) -> dict[str, str]:
        """What `unit`'s replicas get on top of the mesh's environment: a denoiser its group size
        (`MeshConfig.groups`) and how its group splits requests (`MeshConfig.parallel_mode`).
        Nothing else reads them, so the other units are left as they are."""
        env: dict[str, str] = {}
        if unit.service != GROUPED_SERVICE:
            return env
        if unit.name in self.config.groups:
            env["LEGO_DENOISE_GROUP_SIZE"] = str(self.config.groups[unit.name])
        if self.config.parallel_mode:
            env["LEGO_PARALLEL_MODE"] = self.config.parallel_mode
        return env

    def replica_env(self, unit: Unit) -> dict[str, str]:
        """The whole environment a replica of `unit` starts with."""
        # The user's own OpenMP settings win over SHARED_CORES_ENV.
        return {**SHARED_CORES_ENV, **self._env(self.bus_role(unit)), **self.unit_env(unit)}

    def group_size(self, unit: Unit) -> int:
        """Devices one replica of `unit` holds (a model copy each): what its replicas will read."""
        if unit.service != GROUPED_SERVICE:
            return 1
        from shared.settings import Settings

        return Settings.from_env(self.replica_env(unit)).denoise_group_size

    def group_sizes(self) -> dict[str, int]:
        """The units whose replicas are groups (more than one device), and their sizes."""
        units = self.units or {u.name: u for u in self.plan()}
        return {name: k for name, unit in units.items() if (k := self.group_size(unit)) > 1}

    def start(self, ready_timeout_s: float = 300.0) -> None:
        try:
            units = {u.name: u for u in self.plan()}
            unknown = sorted(set(self.config.replicas) - set(units))
            if unknown:
                raise ValueError(f"replicas named for {unknown}, which this mesh does not run; units: {sorted(units)}")
            check_groups(self.config.groups, list(units.values()))
            self.units = units
            self._start_nats()
            self._prepare_models()
            for unit in units.values():
                for i in range(self.config.replicas.get(unit.name, 1)):
                    self.add_replica(unit.name, index=i)
            self.start_front(ready_timeout_s)
            if self.config.autoscale:
                self.start_autoscaler()
        except BaseException:
            self.stop()
            raise

    def start_front(self, ready_timeout_s: float) -> None:
        """The gateway(s), once the replicas are started; returns when the mesh's URL serves
        every workflow (through the balancer when there are several gateways)."""
        gateways = self.add_gateways(self.config.gateways, self.config.port, self.config.auth)
        self.front_urls = [self.gateway_url(self.gateway_ports[g.name]) for g in gateways]
        if len(gateways) > 1:
            self.front_urls.append(self.gateway_url(self.config.port))
        self.wait_ready(ready_timeout_s)

    def add_gateways(self, count: int, port: int, auth: bool, prefix: str = "gateway") -> list[Child]:
        """`count` gateways serving `port`: one listens there itself; several listen on free
        ports behind a balancer on it (`lego up --gateways N`; the tests start more so too)."""
        if count < 1:
            raise ValueError(f"gateways: {count}; at least 1")
        if count == 1:
            return [self.add_gateway(prefix, port, auth)]
        ports = [free_port(self.config.host) for _ in range(count)]
        gateways = [self.add_gateway(f"{prefix}-{i}", p, auth) for i, p in enumerate(ports)]
        self.add_balancer(f"{prefix}-balancer", port, ports)
        return gateways

    def gateway_url(self, port: int) -> str:
        """A gateway's own URL on this machine (the mesh's `url` is the balancer's when several)."""
        scheme = self.url.split(":", 1)[0]
        return f"{scheme}://{_connect_host(self.config.host)}:{port}"

    def add_balancer(self, name: str, port: int, backends: list[int]) -> Child:
        """lego/balancer.py on `port` in front of the gateways on the `backends` ports: round
        robin over those whose /healthz answers 200; stopped with the mesh."""
        argv = [sys.executable, "-m", "lego.balancer", "--listen", f"{self.config.host}:{port}"]
        for backend in backends:
            argv += ["--backend", f"{_connect_host(self.config.host)}:{backend}"]
        if self._env("").get("LEGO_GATEWAY_TLS_CERT"):
            argv.append("--tls")
        balancer = Child(name, argv, self._env(""), self._log_path(name))
        balancer.start()
        with self._lock:
            self.children.append(balancer)
        return balancer

    def add_gateway(self, name: str, port: int, auth: bool) -> Child:
        """A gateway process on this mesh's bus, with API keys on or off; stopped with the mesh.
        Besides the mesh's own: the tests of several gateways and bench/auth.py run more."""
        gateway = Child(
            name,
            [sys.executable, "-m", "services.gateway", "--host", self.config.host, "--port", str(port)],
            {**self._env(bus_roles.GATEWAY), **self.auth_env(auth)},
            self._log_path(name),
        )
        gateway.start()
        with self._lock:
            self.children.append(gateway)
            self.gateways.append(gateway)
            self.gateway_ports[name] = port
        return gateway

    def auth_env(self, auth: bool) -> dict[str, str]:
        """A gateway's LEGO_AUTH and LEGO_ADMIN_KEY_FILE; with auth, the admin key file is made
        (0600) here at the first start, so `lego up` can show the key once."""
        if not auth:
            return {"LEGO_AUTH": "off"}
        from services.gateway.keys.secret import ensure_key_file

        self.admin_key_file = admin_key_path(self.settings().state_dir)
        _, made = ensure_key_file(self.admin_key_file)
        self.admin_key_made = self.admin_key_made or made
        return {"LEGO_AUTH": "on", "LEGO_ADMIN_KEY_FILE": str(self.admin_key_file)}

    def nats_children(self) -> list[Child]:
        """Our own nats-server(s): the single one, or each server of the cluster."""
        if self.nats_cluster is not None:
            return [node.child for node in self.nats_cluster.nodes]
        return [self.nats] if self.nats else []

    def _start_nats(self) -> None:
        if self.config.nats_url:
            if self.config.nats_servers > 1:
                raise ValueError("nats_servers starts our own NATS cluster; not with nats_url (an external NATS)")
            return
        if self.config.nats_servers < 1:
            raise ValueError(f"nats_servers: {self.config.nats_servers}; at least 1")
        store = self.workdir / "jetstream"
        config = None
        if self.config.lock_bus or self.config.nats_tls:
            from shared.settings import Settings

            self.bus_lock = BusLock(Path(Settings.from_env(self._env("")).state_dir), tls=self.config.nats_tls)
            config = self.bus_lock.write_config(self.workdir / "nats-server.conf")
        lock = f"locked: a user per role, passwords in {self.bus_lock.state_dir}/nats" if self.bus_lock else "open"
        # nats-server's banner would bury the services' logs: it always goes to a file.
        if self.config.nats_servers > 1:
            size = self.config.nats_servers
            self.nats_cluster = NatsCluster(
                self.workdir, size, self.config.log_dir or self.workdir, config, tls=self.config.nats_tls
            )
            self.nats_cluster.start()  # each server accepts clients and JetStream has a meta leader
            self.nats_url = self.nats_cluster.url
            self._say(f"{size} nats-servers with JetStream, routed, streams R{size}, on {self.nats_url} ({lock})")
        else:
            self.nats, self.nats_url = start_nats_server(
                store, self._log_path("nats") or self.workdir / "nats.log", config, tls=self.config.nats_tls
            )
            self._say(f"nats-server with JetStream on {self.nats_url} ({lock})")
        prepare_bus(self.settings())

    def _prepare_models(self) -> None:
        """Build the tiny seeded models once, before several services race to do it."""
        if self.config.env.get("LEGO_MODELS_DIR") or os.environ.get("LEGO_MODELS_DIR"):
            return
        self._say("preparing models (built once, then cached)")
        subprocess.run([sys.executable, "-m", "shared.zoo"], env=self._env(""), check=True)

    def settings(self, role: str = bus_roles.ADMIN) -> Any:
        """The Settings every child sees (this environment, `config.env`, the mesh's NATS),
        connecting as `role`: admin by default (the tests and benchmarks talk to the bus so)."""
        from shared.settings import Settings

        return Settings.from_env(self._env(role))

    def start_autoscaler(
        self, policy_overrides: dict[str, Any] | None = None, memory_per_replica: dict[str, int] | None = None
    ) -> None:
        """Scale the units on their backlogs from now on (a thread of this process). The policy
        comes from the LEGO_AUTOSCALE_* settings; `memory_per_replica` (unit -> bytes) replaces
        what the heartbeats report (bench/burst.py counts full-size model bytes against a budget).
        A group replica's heartbeat is its leader's, one model copy: the autoscaler multiplies it
        by the unit's group size (`group_sizes`)."""
        from services.autoscaler.actuators.local import LocalActuator
        from services.autoscaler.controller import AutoscalerThread

        self.autoscaler = AutoscalerThread(
            self.settings(bus_roles.AUTOSCALER),
            LocalActuator(self),
            policy_overrides,
            memory_per_replica,
            group_sizes=self.group_sizes(),
        )
        self.autoscaler.start()
        if self.autoscaler.error is not None:
            raise RuntimeError(f"the autoscaler did not start: {self.autoscaler.error}")
        self._say("autoscaler on (local processes)")

    def unit_models(self) -> dict[str, tuple[str, ...]]:
        return {name: unit.models for name, unit in self.units.items()}

    def replicas_of(self, unit_name: str) -> list[Child]:
        """The unit's replicas that are meant to run (crashed ones too: they get restarted)."""
        with self._lock:
            return [c for c in self.children if c.unit == unit_name and c.retiring_since is None]

    def replica_count(self, unit_name: str) -> int:
        return len(self.replicas_of(unit_name))

    def add_replica(self, unit_name: str, index: int | None = None, share: float = MIN_SHARE) -> Child:
        """Start a replica of the unit; `share`: the compute it is expected to keep busy, where
        several GPUs are placed over (`MeshConfig.gpus`, lego/devices.py)."""
        unit = self.units[unit_name]
        with self._lock:
            if index is None:  # the lowest number no replica of the unit holds (log files are reused)
                taken = {c.name for c in self.children if c.unit == unit_name}
                index = next(i for i in range(len(taken) + 1) if f"{unit.name}-{i}" not in taken)
            name = f"{unit.name}-{index}"
            env = self.replica_env(unit)
            if self.devices is not None:
                env["LEGO_DEVICE"] = self.devices.place(name, share, self.group_size(unit))
            child = Child(name, self.replica_command(unit), env, self._log_path(name), unit=unit.name)
            child.start()
            self.children.append(child)
        return child

    def remove_replica(self, unit_name: str) -> Child | None:
        """Stop the unit's newest replica gracefully: SIGTERM to its group (it stops fetching,
        finishes and acks the step in hand, then exits); it is never restarted. Returns at once."""
        with self._lock:
            replicas = self.replicas_of(unit_name)
            if not replicas:
                return None
            child = replicas[-1]
            child.retiring_since = time.monotonic()
            if self.devices is not None:
                self.devices.release(child.name)
            child.signal_group(signal.SIGTERM)
            self._say(f"stopping {child.name} (scale-down)")
        return child

    def wait_ready(self, timeout_s: float) -> None:
        """Until every workflow this mesh serves has a live replica of each of its models, as
        each gateway and the balancer in front of them (if any) answer."""
        wanted = [(url, w) for url in self.front_urls or [self.url] for w in self.config.workflows or ["all"]]
        give_up = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < give_up:
            dead = [c.name for c in self.children if not c.alive()]
            if dead:
                raise RuntimeError(
                    f"{', '.join(dead)} exited during start; see the log above or in {self.config.log_dir}"
                )
            try:
                # verify=False: this asks our own child on this machine whether it is ready, over
                # HTTPS with whatever certificate the user gave it (issued for a public name).
                pending = [
                    f"{w} at {url}"
                    for url, w in wanted
                    if httpx.get(f"{url}/readyz", params={"workflow": w}, timeout=2, verify=False).status_code != 200
                ]
                if not pending:
                    count = len(self.front_urls) - 1
                    self._say(
                        f"ready: {f'{count} gateways behind a balancer' if count > 1 else 'gateway'} on {self.url}"
                    )
                    return
                last = f"waiting for {', '.join(pending)}"
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise TimeoutError(f"mesh not ready within {timeout_s:.0f}s (last answer: {last})")

    def restart_dead(self) -> list[str]:
        """Start again any service child (or server of our NATS cluster) that died; returns their
        names. Replicas stopped on purpose are not restarted: once gone they leave the list (or
        are killed after RETIRE_GRACE_S if their step never ends)."""
        restarted = []
        with self._lock:
            for child in list(self.children):
                if child.retiring_since is not None:
                    if not child.alive():
                        self.children.remove(child)
                    elif time.monotonic() - child.retiring_since > RETIRE_GRACE_S:
                        child.signal_group(signal.SIGKILL)
                    continue
                if not child.alive():
                    child.restarts += 1
                    child.start()
                    restarted.append(child.name)
            if self.nats_cluster is not None:  # a cluster's server rejoins (same name, ports, store)
                for nats in self.nats_children():
                    if not nats.alive():
                        nats.restarts += 1
                        nats.start()
                        restarted.append(nats.name)
        return restarted

    def stop(self) -> None:
        """SIGTERM the gateways and wait for them to drain (GATEWAY_DRAIN_S at most: they may
        wait on the replicas, which still run), then SIGTERM every other group (services finish
        their step), then SIGKILL what is left."""
        if self.autoscaler is not None:  # first: nothing may start replicas while we stop them
            self.autoscaler.stop()
            self.autoscaler = None
        everyone = list(reversed(self.children)) + self.nats_children()
        with self._lock:
            gateways = list(self.gateways)
        for gateway in gateways:
            gateway.signal_group(signal.SIGTERM)
        wait_gone(gateways, GATEWAY_DRAIN_S)
        for child in reversed(self.children):
            child.signal_group(signal.SIGTERM)
        wait_gone(self.children, STOP_GRACE_S)
        servers = self.nats_children()  # every server of a cluster at once: none waits on the others
        for nats in servers:
            nats.signal_group(signal.SIGTERM)
        wait_gone(servers, 10 if self.nats_cluster else 5)
        for child in everyone:
            child.signal_group(signal.SIGKILL)
            if child.proc is not None:
                try:
                    child.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        shutil.rmtree(self.workdir, ignore_errors=True)


def _connect_host(host: str) -> str:
    """Where this machine reaches a child bound to `host`: a wildcard bind is reached on loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
