"""The compose actuator: the model services of a docker compose project, scaled through the
Docker Engine API on the mounted socket (`/var/run/docker.sock`), as `docker compose up -d
--scale SERVICE=N` would do it: a new replica is a copy of the service's first container
(same image, command, environment, labels, volumes, networks with the service's alias) named
`<project>-<service>-<n>`; a replica going away is stopped with a 120 s grace (SIGTERM: it
finishes the step in hand) and then removed, highest number first.

It finds its units by the labels deploy/docker-compose.yml puts on the model services:
`io.legodiffusion.models` (the models a container hosts) within its own compose project
(`com.docker.compose.project` of its own container, or `--compose-project`).

No Docker daemon is reachable here: tests/unit/test_autoscaler_actuators.py runs this code
against canned Engine API answers (written to the API's documented shapes, not captured from
a live daemon) through httpx's mock transport, so the requests it sends are checked too.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from typing import Any

import httpx

log = logging.getLogger("lego.autoscaler.compose")

PROJECT = "com.docker.compose.project"
SERVICE = "com.docker.compose.service"
NUMBER = "com.docker.compose.container-number"
MODELS = "io.legodiffusion.models"
STOP_GRACE_S = 120


def docker_client(socket_path: str = "/var/run/docker.sock") -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=socket_path), base_url="http://docker", timeout=30)


class ComposeActuator:
    name = "compose"

    def __init__(self, project: str | None = None, client: httpx.Client | None = None) -> None:
        self.http = client if client is not None else docker_client()
        self.project = project or os.environ.get("COMPOSE_PROJECT_NAME") or self._own_project()
        self._stopping: set[str] = set()
        self._lock = threading.Lock()

    def _get(self, path: str, **params: Any) -> Any:
        r = self.http.get(path, params=params)
        r.raise_for_status()
        return r.json()

    def _own_project(self) -> str:
        """The compose project of the container this runs in (its id is the hostname)."""
        labels = self._get(f"/containers/{socket.gethostname()}/json")["Config"]["Labels"] or {}
        if PROJECT not in labels:
            raise RuntimeError("not running in a compose container: pass --compose-project")
        return labels[PROJECT]

    def _containers(self, service: str | None = None) -> list[dict[str, Any]]:
        labels = [f"{PROJECT}={self.project}", f"{SERVICE}={service}" if service else MODELS]
        found = self._get("/containers/json", all="true", filters=json.dumps({"label": labels}))
        with self._lock:
            return [c for c in found if c["Id"] not in self._stopping and c["State"] not in ("exited", "dead")]

    def units(self) -> dict[str, tuple[str, ...]]:
        units = {}
        for c in self._containers():
            models = tuple(m.strip() for m in c["Labels"].get(MODELS, "").split(",") if m.strip())
            units[c["Labels"][SERVICE]] = models
        return units

    def current(self, unit: str) -> int:
        return len(self._containers(unit))

    def scale(self, unit: str, replicas: int, share: float = 0.0) -> None:
        running = sorted(self._containers(unit), key=lambda c: int(c["Labels"].get(NUMBER, "0")))
        if not running:
            raise RuntimeError(f"compose service {unit} has no container to copy; start it with docker compose first")
        taken = {int(c["Labels"].get(NUMBER, "0")) for c in self._all_numbers(unit)}
        for _ in range(replicas - len(running)):
            number = next(n for n in range(1, len(taken) + 2) if n not in taken)
            taken.add(number)
            self._start_copy(running[0]["Id"], unit, number)
        for c in reversed(running[replicas:] if replicas < len(running) else []):
            with self._lock:
                self._stopping.add(c["Id"])
            threading.Thread(target=self._stop_and_remove, args=(c["Id"],), daemon=True).start()

    def _all_numbers(self, unit: str) -> list[dict[str, Any]]:
        labels = [f"{PROJECT}={self.project}", f"{SERVICE}={unit}"]
        return self._get("/containers/json", all="true", filters=json.dumps({"label": labels}))

    def _start_copy(self, template_id: str, service: str, number: int) -> str:
        t = self._get(f"/containers/{template_id}/json")
        config = t["Config"]
        labels = {**(config.get("Labels") or {}), NUMBER: str(number)}
        networks = {
            name: {"Aliases": [service]} for name in (t.get("NetworkSettings", {}).get("Networks") or {}).keys()
        }
        body = {
            "Image": config["Image"],
            "Cmd": config.get("Cmd"),
            "Entrypoint": config.get("Entrypoint"),
            "Env": config.get("Env"),
            "User": config.get("User", ""),
            "WorkingDir": config.get("WorkingDir", ""),
            "Labels": labels,
            "Healthcheck": config.get("Healthcheck"),
            "StopSignal": config.get("StopSignal") or "SIGTERM",
            "HostConfig": {k: v for k, v in t["HostConfig"].items() if k != "PortBindings"},
            "NetworkingConfig": {"EndpointsConfig": networks},
        }
        name = f"{self.project}-{service}-{number}"
        r = self.http.post("/containers/create", params={"name": name}, json=body)
        r.raise_for_status()
        new_id = r.json()["Id"]
        self.http.post(f"/containers/{new_id}/start").raise_for_status()
        log.info("started %s (%s)", name, new_id[:12])
        return new_id

    def _stop_and_remove(self, container_id: str) -> None:
        try:
            self.http.post(
                f"/containers/{container_id}/stop", params={"t": STOP_GRACE_S}, timeout=STOP_GRACE_S + 30
            ).raise_for_status()
            self.http.delete(f"/containers/{container_id}").raise_for_status()
            log.info("stopped and removed %s", container_id[:12])
        except httpx.HTTPError as exc:
            log.warning("stopping %s: %s", container_id[:12], exc)
        finally:
            with self._lock:
                self._stopping.discard(container_id)
