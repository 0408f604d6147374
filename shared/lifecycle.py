"""How a long-running process of the mesh starts and stops (a model service, the autoscaler):
one event that SIGTERM / SIGINT sets, and one way to run the main coroutine and report a
missing NATS.

The event loop is uvloop's where it is installed (a dependency on Linux), as uvicorn's is for
the gateway: on the bus's hot path (a step pulled, computed, answered, acked) asyncio's own loop
cost about a sixth of a no-op replica's CPU more (bench/control_plane.py). LEGO_EVENT_LOOP=asyncio
runs the standard loop instead (to rule uvloop out when something misbehaves).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on uvloop's loop where installed, unless LEGO_EVENT_LOOP=asyncio."""
    if os.environ.get("LEGO_EVENT_LOOP", "auto") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def stop_on_signals() -> asyncio.Event:
    """An event SIGTERM or SIGINT sets, so that the process finishes what it holds and closes
    its connections instead of dying mid-step. Call it inside the running loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def run_until_stopped(main: Coroutine[Any, Any, None], log: logging.Logger) -> None:
    """`run(main)`: Ctrl-C ends it quietly, and no NATS / no JetStream (a `ConnectionError`)
    ends it with one clear log line and exit status 1, not a traceback."""
    try:
        run(main)
    except KeyboardInterrupt:
        pass
    except ConnectionError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
