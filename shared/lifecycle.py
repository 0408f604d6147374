"""How a long-running process of the mesh starts and stops (a model service, the autoscaler):
one event that SIGTERM / SIGINT sets, and one way to run the main coroutine and report a
missing NATS."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any


def stop_on_signals() -> asyncio.Event:
    """An event SIGTERM or SIGINT sets, so that the process finishes what it holds and closes
    its connections instead of dying mid-step. Call it inside the running loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def run_until_stopped(main: Coroutine[Any, Any, None], log: logging.Logger) -> None:
    """`asyncio.run(main)`: Ctrl-C ends it quietly, and no NATS / no JetStream (a
    `ConnectionError`) ends it with one clear log line and exit status 1, not a traceback."""
    try:
        asyncio.run(main)
    except KeyboardInterrupt:
        pass
    except ConnectionError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
