"""`lego keys create|list|revoke`: manage the gateway's API keys through its `/v1/keys` routes,
and the one rule every `lego` command uses to find the key it sends.

Which key: `--api-key`, else $LEGO_API_KEY, else the admin key `lego up` keeps in
<state_dir>/admin.key (so on the machine that runs the mesh, commands just work).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx

ADMIN_KEY_FILE = "admin.key"
PERSISTENCE_NOTE = (
    "note: `lego up`'s own nats-server keeps keys in a temporary store: they last until the mesh "
    "stops (its admin key is restored from its file at each start)"
)


def admin_key_path(state_dir: str) -> Path:
    return Path(state_dir) / ADMIN_KEY_FILE


def resolve_api_key(flag: str | None) -> str | None:
    """The key to send: the flag, $LEGO_API_KEY, or the admin key file (None: send no key)."""
    if flag:
        return flag
    if os.environ.get("LEGO_API_KEY"):
        return os.environ["LEGO_API_KEY"]
    from shared.settings import Settings

    path = admin_key_path(Settings.from_env().state_dir)
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def auth_headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def cmd_keys(args: argparse.Namespace) -> int:
    """Create, list or revoke keys (the admin scope)."""
    headers = auth_headers(resolve_api_key(args.api_key))
    try:
        with httpx.Client(base_url=args.url, headers=headers, timeout=30) as client:
            return _KEY_COMMANDS[args.keys_command](client, args)
    except httpx.HTTPError as exc:
        print(f"lego keys: cannot reach the gateway at {args.url}: {exc} (is `lego up` running?)", file=sys.stderr)
        return 1


def _refused(r: httpx.Response) -> int:
    try:
        err = r.json()["error"]
        print(f"lego keys: HTTP {r.status_code} {err['code']}: {err['message']}", file=sys.stderr)
    except (ValueError, KeyError, TypeError):
        print(f"lego keys: HTTP {r.status_code}: {r.text[:300]}", file=sys.stderr)
    return 1


def _create(client: httpx.Client, args: argparse.Namespace) -> int:
    body = {
        "name": args.name,
        "scopes": args.scope or ["generate"],
        "rate_per_min": args.rate,
        "max_in_flight": args.max_in_flight,
        "max_priority": args.max_priority,
    }
    r = client.post("/v1/keys", json=body)
    if r.status_code != 201:
        return _refused(r)
    made = r.json()
    print(made["key"])  # alone on stdout, for `KEY=$(lego keys create ...)`
    print(
        f"key {made['name']!r} ({made['key_id']}, scopes {','.join(made['scopes'])}): shown this once, "
        f"stored only as its hash; send it as `Authorization: Bearer <key>`\n{PERSISTENCE_NOTE}",
        file=sys.stderr,
    )
    return 0


def _list(client: httpx.Client, args: argparse.Namespace) -> int:
    r = client.get("/v1/keys")
    if r.status_code != 200:
        return _refused(r)
    keys = r.json()["keys"]
    if args.json:
        print(json.dumps(keys, indent=2))
        return 0
    rows = [("NAME", "KEY ID", "SCOPES", "RATE/MIN", "IN FLIGHT", "MAX PRIORITY", "CREATED")]
    for k in keys:
        created = datetime.fromtimestamp(k["created"], UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        limits = [str(k["rate_per_min"] or "-"), str(k["max_in_flight"] or "-"), str(k["max_priority"])]
        rows.append((k["name"], k["key_id"], ",".join(k["scopes"]), *limits, created))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _revoke(client: httpx.Client, args: argparse.Namespace) -> int:
    r = client.delete(f"/v1/keys/{args.name}")
    if r.status_code != 200:
        return _refused(r)
    print(f"revoked {args.name!r}: every gateway refuses it within seconds")
    return 0


_KEY_COMMANDS = {"create": _create, "list": _list, "revoke": _revoke}


def add_parser(sub: argparse._SubParsersAction, default_url: str) -> None:
    """`lego keys` and its three commands."""
    keys = sub.add_parser("keys", help="create, list and revoke the gateway's API keys (needs the admin key)")
    keys.add_argument("--url", default=default_url, help="gateway URL (default: %(default)s)")
    add_api_key_flag(keys)
    cmds = keys.add_subparsers(dest="keys_command", required=True)
    create = cmds.add_parser("create", help="make a key; it is printed once (stdout), keep it")
    create.add_argument("name", help="unique name: letters, digits, '-' or '_' (metrics are labelled by it)")
    create.add_argument(
        "--scope",
        action="append",
        choices=["generate", "admin"],
        help="repeatable; generate: make images; admin: manage keys, see the mesh (default: generate)",
    )
    create.add_argument("--rate", type=int, default=60, help="generation requests a minute (0: none; default 60)")
    create.add_argument("--max-in-flight", type=int, default=4, help="requests running at once (0: none; default 4)")
    create.add_argument("--max-priority", type=int, default=0, help="highest request priority, 0-9 (default 0)")
    ls = cmds.add_parser("list", help="names, ids, scopes and limits (never the keys)")
    ls.add_argument("--json", action="store_true", help="print the gateway's JSON")
    revoke = cmds.add_parser("revoke", help="revoke a key by name; every gateway refuses it within seconds")
    revoke.add_argument("name")
    keys.set_defaults(func=cmd_keys)


def add_api_key_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-key",
        help="API key to send (default: $LEGO_API_KEY, else the admin key `lego up` saved in <state dir>/admin.key)",
    )
