"""The locked bus of a mesh this machine runs: its nats-server config, each child's credentials,
and the streams made before anyone else connects.

Why here and not in the launcher: the launcher decides which processes run; this decides what
each may do on the bus (its role: shared.bus_roles) and hands it the role's password file,
never the password. `lego up` itself (and `Mesh.settings()`, which the tests use) is admin.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path

from lego import nats_secrets
from lego.tls_certs import ensure_certificates
from shared import bus_roles


@dataclass
class BusLock:
    """Users, passwords and (optionally) TLS for a nats-server that a mesh starts itself."""

    state_dir: Path
    tls: bool = False
    tls_ca: Path | None = None

    def write_config(self, path: Path) -> Path:
        """The server's config (hashes, permissions, TLS) at `path`; passwords made if missing."""
        server_tls = None
        if self.tls:
            certs = ensure_certificates(self.state_dir)
            self.tls_ca = certs.ca
            server_tls = nats_secrets.ServerTls(certs.cert, certs.key)
        return nats_secrets.write_server_config(path, nats_secrets.secrets_dir(self.state_dir), server_tls)

    def env(self, role: str) -> dict[str, str]:
        """LEGO_NATS_* of a child connecting as `role` ("": a child that never connects)."""
        env = {"LEGO_NATS_USER": "", "LEGO_NATS_PASSWORD_FILE": ""}
        if role:
            if role not in bus_roles.ROLES:
                raise ValueError(f"unknown bus role {role!r}; roles: {', '.join(bus_roles.ROLES)}")
            env.update(
                LEGO_NATS_USER=role,
                LEGO_NATS_PASSWORD_FILE=str(nats_secrets.password_file(self.state_dir, role)),
            )
        if self.tls_ca is not None:
            env["LEGO_NATS_TLS_CA"] = str(self.tls_ca)
        return env


def prepare_bus(settings: object) -> None:
    """Create the streams and buckets (as admin) before any service starts: services of a
    locked bus may not create them, and they find them there instead of waiting. Runs on a
    thread of its own so a caller inside an event loop can call it too."""
    from shared.bus import Bus
    from shared.presence import ensure_buckets

    async def create() -> None:
        bus = Bus(settings, name="lego")  # type: ignore[arg-type]
        await bus.connect()
        try:
            await bus.ensure_streams()
            await ensure_buckets(bus)
        finally:
            await bus.close()

    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(create())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name="lego-prepare-bus")
    thread.start()
    thread.join()
    if failure:
        raise RuntimeError(f"could not create the streams on the mesh's NATS: {failure[0]}") from failure[0]
