"""Run a module under cProfile, timing CPU (not wall time: on a shared box a process waiting
for a core would look busy), and write the profile when it exits, SIGTERM included.

    python -m bench.profiled OUT.prof services.gateway --port 8001
"""

from __future__ import annotations

import cProfile
import runpy
import signal
import sys
import time


def main() -> None:
    out, module, *args = sys.argv[1:]
    # uvicorn re-raises the SIGTERM it caught once it has shut down: end as an exit, so the
    # profile below is written.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.argv = [module, *args]
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        profiler.disable()
        profiler.dump_stats(out)


if __name__ == "__main__":
    main()


# Where a process's CPU went, by the code it ran: the first pattern in a function's file (or,
# for built-ins, its name) that matches picks its category.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("start-up (imports)", ("importlib", "<frozen", "compile", "marshal", "_generate_schema", "_model_construction")),
    ("HTTP (uvicorn, starlette, fastapi, h11)", ("uvicorn", "starlette", "fastapi", "h11", "httptools")),
    ("NATS client (nats-py)", ("site-packages/nats/",)),
    ("pydantic / JSON", ("pydantic", "json", "validate_json", "validate_python", "to_json", "model_dump")),
    ("asyncio event loop", ("asyncio", "selectors", "epoll", "_contextvars", "socket")),
    ("tensor plane", ("tensor_plane",)),
    ("images (PIL, numpy)", ("PIL", "numpy")),
    ("tracing / metrics", ("opentelemetry", "tracing.py", "metrics.py", "prometheus")),
    ("gateway", ("services/gateway",)),
    ("worker / bus wrapper", ("shared/",)),
)


def _category(filename: str, name: str) -> str | None:
    where = f"{filename}:{name}"
    return next((c for c, patterns in CATEGORIES if any(p in where for p in patterns)), None)


def cpu_breakdown(path: str) -> dict[str, float]:
    """Seconds of CPU (a process_time profile's own time) by category, largest first. A
    function of no category (a built-in such as isinstance, the standard library) counts
    for the categories of its callers, in proportion to the time each call cost."""
    import pstats

    stats = pstats.Stats(path).stats  # type: ignore[attr-defined]
    out: dict[str, float] = {}

    def add(category: str, seconds: float) -> None:
        out[category] = out.get(category, 0.0) + seconds

    for (filename, _, name), (_, _, tottime, _, callers) in stats.items():
        category = _category(filename, name)
        if category is not None:
            add(category, tottime)
            continue
        shares = {c: v[2] for c, v in callers.items()} if callers else {}
        total = sum(shares.values())
        if total <= 0:
            add("other", tottime)
            continue
        for (cfile, _, cname), share in shares.items():
            add(_category(cfile, cname) or "other", tottime * share / total)
    return dict(sorted(((k, round(v, 3)) for k, v in out.items()), key=lambda kv: -kv[1]))
