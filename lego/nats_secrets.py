"""The locked bus's secrets and nats-server config: one password per role, only hashes in the config.

Why files: a password in an environment variable shows in `ps e` and crash dumps; a file with
0600 permissions under `state_dir/nats/` is read by its owner only. They are made at first
start and kept, so a restarted `lego up` (and a service restarted by it) keeps its password.
The server config holds bcrypt hashes and the roles' permissions (shared.bus_roles); it is
written afresh at each start (into the mesh's own directory), so a new model's consumers are
allowed at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import bcrypt

from shared import bus_roles

PASSWORD_BYTES = 32
BCRYPT_ROUNDS = 10  # ~0.07 s a hash: once per role at each start, and per client connect on the server


@dataclass(frozen=True)
class ServerTls:
    """The certificate (chain) and key nats-server serves TLS with."""

    cert: Path
    key: Path


def secrets_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / "nats"


def password_file(state_dir: str | Path, role: str) -> Path:
    return secrets_dir(state_dir) / f"{role}.password"


def write_private(path: Path, data: bytes) -> bool:
    """Write `data` to a new file readable by its owner only, atomically: False when the file
    exists already (another process was first; its content wins, ours is dropped)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.link(tmp, path)  # fails if it exists: two first starts agree on one password
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def ensure_passwords(directory: Path, roles: tuple[str, ...] = bus_roles.ROLES) -> dict[str, Path]:
    """Each role's password file in `directory`, made (random, 0600) where missing: role -> path."""
    files = {}
    for role in roles:
        path = directory / f"{role}.password"
        if not path.exists():
            write_private(path, secrets.token_urlsafe(PASSWORD_BYTES).encode())
        files[role] = path
    return files


def bcrypt_hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_ROUNDS)).decode()


def role_hash(directory: Path, role: str) -> str:
    """The bcrypt hash of a role's password, kept beside it (`<role>.hash`, 0600) so that each
    start does not pay the hashing again; a changed password file gets a new hash."""
    password = (directory / f"{role}.password").read_text().strip()
    digest = hashlib.sha256(password.encode()).hexdigest()
    cache = directory / f"{role}.hash"
    try:
        kept = json.loads(cache.read_text())
        if kept.get("sha256") == digest:
            return str(kept["bcrypt"])
    except (OSError, ValueError, KeyError):
        pass
    hashed = bcrypt_hash(password)
    cache.unlink(missing_ok=True)
    write_private(cache, json.dumps({"sha256": digest, "bcrypt": hashed}).encode())
    return hashed


def _quoted(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def authorization_block(passwords: Mapping[str, str]) -> str:
    """nats-server's `authorization { users = [...] }`: each role's user, its password (a
    bcrypt hash in quotes, or `$NAME`, a variable the server reads from its environment) and
    its permissions. Subjects are quoted: `$JS...` unquoted would be read as a variable."""
    lines = ["authorization {", "  users = ["]
    for role, password in passwords.items():
        perms = bus_roles.permissions(role)
        value = password if password.startswith("$") and not password.startswith("$2") else json.dumps(password)
        entry = f"    {{user: {json.dumps(role)}, password: {value}"
        if perms.publish is not None and perms.subscribe is not None:
            entry += (
                f",\n      permissions: {{\n        publish: {{allow: {_quoted(perms.publish)}}},\n"
                f"        subscribe: {{allow: {_quoted(perms.subscribe)}}}\n      }}"
            )
        lines.append(entry + "}")
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def tls_block(tls: ServerTls) -> str:
    return f"tls {{\n  cert_file: {json.dumps(str(tls.cert))}\n  key_file: {json.dumps(str(tls.key))}\n}}\n"


def server_config(directory: Path, tls: ServerTls | None = None) -> str:
    """The config of a locked nats-server for the passwords in `directory` (made if missing)."""
    hashes = {role: role_hash(directory, role) for role in ensure_passwords(directory)}
    text = "# Written by lego at start: bcrypt hashes of state_dir/nats/*.password and each role's permissions.\n"
    return text + authorization_block(hashes) + (tls_block(tls) if tls else "")


def write_server_config(path: Path, directory: Path, tls: ServerTls | None = None) -> Path:
    """`server_config` of the passwords in `directory` into `path` (0600: the hashes are no one
    else's business; a nats-server running as another user gets it through its own volume)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(server_config(directory, tls))
    return path
