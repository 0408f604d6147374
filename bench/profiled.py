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
