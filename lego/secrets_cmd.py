"""`lego secrets`: the locked bus's secrets for a deployment, made where they are used.

- `lego secrets --dir /secrets` (compose's init service): each role's password file (0600)
  in the directory, made when missing, and `nats-server.conf` (bcrypt hashes, permissions);
  with `--copy-to`, each role's password in its own directory and the gateway's admin API key
  (`<copy-to>/gateway/admin.key`, made once: the key an operator makes the other keys with).
- `lego secrets --k8s [--namespace N]`: a Kubernetes Secret on stdout, for
  `lego secrets --k8s | kubectl apply -f -`: each role's password (what its pods mount), its
  bcrypt hash (what nats-server's config reads as `$NATS_HASH_<ROLE>`) and the admin API key
  (`admin.key`, the gateway's). Never commit it.
- `lego secrets --nats-config-env`: the nats-server authorization block with `$NATS_HASH_<ROLE>`
  variables instead of hashes (what deploy/k8s/20-nats.yaml holds; tests/unit/test_deploy.py
  checks that the committed one is this one).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import sys
from pathlib import Path

from lego import nats_secrets
from services.gateway.keys.secret import ensure_key_file, new_key
from shared import bus_roles

ADMIN_KEY = "admin.key"  # the gateway's admin API key: in the gateway's secret volume (compose) or Secret (k8s)


def hash_variable(role: str) -> str:
    """The environment variable nats-server reads a role's bcrypt hash from (deploy configs)."""
    return f"NATS_HASH_{role.upper()}"


def nats_config_with_env_hashes() -> str:
    """The authorization block whose passwords are `$NATS_HASH_<ROLE>` (set from the Secret)."""
    return nats_secrets.authorization_block({role: f"${hash_variable(role)}" for role in bus_roles.ROLES})


def k8s_secret(namespace: str, name: str = "lego-nats") -> str:
    """A Secret (JSON, which kubectl reads as YAML) with fresh passwords and their hashes."""
    data: dict[str, str] = {}
    for role in bus_roles.ROLES:
        password = secrets.token_urlsafe(nats_secrets.PASSWORD_BYTES)
        data[f"{role}.password"] = password
        # Quoted: nats-server parses the variable's value as config, where a bare `$2b$...` is a variable.
        data[hash_variable(role)] = json.dumps(nats_secrets.bcrypt_hash(password))
    data[ADMIN_KEY] = new_key()
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": "Opaque",
        "data": encoded,
    }
    return json.dumps(secret, indent=2) + "\n"


def cmd_secrets(args: argparse.Namespace) -> int:
    if args.k8s:
        sys.stdout.write(k8s_secret(args.namespace))
        return 0
    if args.nats_config_env:
        sys.stdout.write(nats_config_with_env_hashes())
        return 0
    if not args.dir:
        print("lego secrets: pass --dir DIR, --k8s or --nats-config-env", file=sys.stderr)
        return 2
    directory = Path(args.dir)
    nats_secrets.write_server_config(directory / "nats-server.conf", directory)
    if args.copy_to:
        copy_per_role(directory, Path(args.copy_to), args.owner)
        admin_key = Path(args.copy_to) / bus_roles.GATEWAY / ADMIN_KEY
        _, made = ensure_key_file(admin_key)
        if args.owner is not None:
            os.chown(admin_key, args.owner, args.owner)
        print(f"lego secrets: the admin API key {'made in' if made else 'kept in'} {admin_key}", file=sys.stderr)
    print(f"lego secrets: passwords (0600) and nats-server.conf in {directory}", file=sys.stderr)
    return 0


def copy_per_role(directory: Path, target: Path, owner: int | None) -> None:
    """Each role's password into `target/<role>/<role>.password` (0600, owned by `owner`): one
    volume per role, so a container mounts its own password and no other."""
    for role in bus_roles.ROLES:
        dest = target / role / f"{role}.password"
        password = (directory / f"{role}.password").read_bytes()
        if dest.exists() and dest.read_bytes() == password:
            continue
        dest.unlink(missing_ok=True)
        nats_secrets.write_private(dest, password)
        if owner is not None:
            os.chown(dest, owner, owner)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("secrets", help="make the locked bus's passwords and nats-server config for a deployment")
    p.add_argument("--dir", help="write <role>.password (0600, kept if present) and nats-server.conf here")
    p.add_argument("--copy-to", help="with --dir: copy each role's password to COPY_TO/<role>/<role>.password too")
    p.add_argument("--owner", type=int, help="with --copy-to: the uid (and gid) that owns the copies")
    p.add_argument("--k8s", action="store_true", help="print a Kubernetes Secret (pipe it to kubectl apply -f -)")
    p.add_argument("--namespace", default="legodiffusion", help="the Secret's namespace (default: %(default)s)")
    p.add_argument(
        "--nats-config-env", action="store_true", help="print the authorization block with $NATS_HASH_<ROLE> variables"
    )
    p.set_defaults(func=cmd_secrets)
