"""A follower of a denoiser group: one process per extra device, started by the leader.

It joins the group's `torch.distributed` process group, loads the same model onto its own
device, proves it holds the same weights, then runs the parts of calls the leader sends it,
in order, until told to stop or until the leader is gone (its socket closes, or it is no
longer this process's parent): a follower never outlives its replica.

    python -m services.denoiser.group.follower --rank R --world K --offset O --init tcp://127.0.0.1:PORT \
        --model MODEL --channel-fd FD
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import traceback

log = logging.getLogger("lego.denoiser.group")


def _exit_with_parent(parent: int) -> None:
    """Leave when the leader process is gone, even if it died while this one waited elsewhere."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, required=True, help="this follower's process rank (1..K-1+offset)")
    parser.add_argument("--world", type=int, required=True, help="devices in the group (K)")
    parser.add_argument(
        "--offset", type=int, default=0, help="1 when the leader runs no device: this rank runs device R-1"
    )
    parser.add_argument("--init", required=True, help="the leader's rendezvous, tcp://HOST:PORT")
    parser.add_argument("--model", required=True, help="the denoiser model id the leader serves")
    parser.add_argument(
        "--channel-fd", type=int, required=True, help="this process's end of its socket pair with the leader"
    )
    parser.add_argument("--parent", type=int, default=0, help="the leader's pid (exit when it is gone)")
    args = parser.parse_args(argv)

    from shared.logs import setup_logging
    from shared.settings import Settings

    settings = Settings.from_env()
    setup_logging(f"denoiser-follower-{args.rank}", settings.log_level)
    # A stop signal to the replica's process group is the leader's to act on: it finishes the
    # step in hand (which needs this follower), then tells it to stop.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if args.parent:
        _exit_with_parent(args.parent)
    import socket

    from services.denoiser.group.runtime import join_group, serve_follower
    from services.denoiser.group.wire import Channel
    from shared.replica import configure_torch

    configure_torch(settings)  # LEGO_TORCH_THREADS as the leader applies it

    try:
        rank_state = join_group(settings, args.model, args.rank, args.world, args.init, offset=args.offset)
        serve_follower(rank_state, Channel(socket.socket(fileno=args.channel_fd)))
    except Exception:  # the leader sees the group break; say why here
        log.error("group follower %d stopped: %s", args.rank, traceback.format_exc(limit=3))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
