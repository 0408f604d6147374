#!/usr/bin/env python3
"""Health probes for the LegoDiffusion containers (installed in the image as `lego-probe`).

    lego-probe http URL     exit 0 when URL answers 2xx (the gateway's /healthz and /readyz)
    lego-probe listening    exit 0 when a TCP socket listens in this network namespace

Model services have no HTTP port yet. Their tensor server starts listening only after the
models are loaded and the step workers are about to start, and it is the only listener in
its container (or pod), so "something listens here" means "this replica is up and serving".
Its port is ephemeral, hence this check instead of a TCP probe on a fixed port.
Standard library only: it runs in the image's Python with nothing else.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from pathlib import Path

LISTEN = "0A"  # the TCP state column of /proc/net/tcp{,6}


def listening_ports(proc_net_tcp: str) -> set[int]:
    """Local ports in LISTEN state in the text of a /proc/net/tcp or /proc/net/tcp6 file."""
    ports = set()
    for line in proc_net_tcp.splitlines()[1:]:
        cols = line.split()
        if len(cols) > 3 and cols[3] == LISTEN:
            ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def check_listening(proc_net: Path = Path("/proc/net")) -> str | None:
    """None when something listens, else why not."""
    ports: set[int] = set()
    for name in ("tcp", "tcp6"):
        path = proc_net / name
        if path.exists():
            ports |= listening_ports(path.read_text())
    return None if ports else "no TCP socket listens yet (the service is still loading its models, or it stopped)"


def check_http(url: str, timeout_s: float = 3.0) -> str | None:
    """None when `url` answers 2xx, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return None if 200 <= response.status < 300 else f"{url} answered {response.status}"
    except urllib.error.HTTPError as exc:
        return f"{url} answered {exc.code}"
    except (OSError, ValueError) as exc:
        return f"{url}: {exc}"


def main(argv: list[str]) -> int:
    if argv[:1] == ["listening"] and len(argv) == 1:
        problem = check_listening()
    elif argv[:1] == ["http"] and len(argv) == 2:
        problem = check_http(argv[1])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
