"""`python -m services.autoscaler --actuator kubernetes|compose`: the autoscaler as its own process.

The local actuator runs inside `lego up` (which owns the processes it scales), not here.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from services.autoscaler.actuators import ACTUATORS, Actuator
from services.autoscaler.controller import Autoscaler, policy_config
from shared.bus import Bus
from shared.logs import setup_logging
from shared.settings import Settings

log = logging.getLogger("lego.autoscaler")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.autoscaler",
        description="LegoDiffusion autoscaler: scales each unit on its JetStream backlog against a latency SLO.",
        epilog="Every setting also reads LEGO_AUTOSCALE_* (see shared/settings.py). The local actuator runs "
        "inside `lego up`, which autoscales by default.",
    )
    parser.add_argument("--actuator", choices=ACTUATORS, required=True, help="how replicas are started and stopped")
    parser.add_argument("--nats-url", help="NATS with JetStream (default: $LEGO_NATS_URL or nats://127.0.0.1:4222)")
    parser.add_argument("--slo", help="latency SLO: '5x' (times the solo latency) or seconds, e.g. '12s' (default 5x)")
    parser.add_argument("--min", dest="autoscale_min", help="replicas at least: N, or N,UNIT=N,... (default 1)")
    parser.add_argument("--max", dest="autoscale_max", help="replicas at most: N, or N,UNIT=N,... (default 3)")
    parser.add_argument("--cooldown", type=float, help="seconds a unit must want fewer before it shrinks (default 30)")
    parser.add_argument("--interval", type=float, help="seconds between decisions (default 1)")
    parser.add_argument("--namespace", help="kubernetes: the namespace to scale (default: the pod's own, else lego)")
    parser.add_argument("--compose-project", help="compose: the project to scale (default: this container's)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO)")
    return parser


def make_actuator(args: argparse.Namespace) -> Actuator:
    if args.actuator == "kubernetes":
        from services.autoscaler.actuators.kubernetes import KubernetesActuator

        return KubernetesActuator(namespace=args.namespace)
    if args.actuator == "compose":
        from services.autoscaler.actuators.compose import ComposeActuator

        return ComposeActuator(project=args.compose_project)
    raise SystemExit(
        "the local actuator runs inside `lego up` (it scales the processes lego up owns); "
        "use `lego up` (autoscaling is on by default), or --actuator kubernetes|compose here"
    )


async def serve(settings: Settings, actuator: Actuator) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bus = Bus(settings, name="autoscaler")
    await bus.connect()
    try:
        autoscaler = Autoscaler(
            bus,
            actuator,
            policy_config(settings),
            interval_s=settings.autoscale_interval_s,
            window_s=settings.autoscale_window_s,
        )
        await autoscaler.run(stop)
    finally:
        await bus.close()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    settings = Settings.from_env(
        nats_url=args.nats_url,
        log_level=args.log_level,
        autoscale_slo=args.slo,
        autoscale_min=args.autoscale_min,
        autoscale_max=args.autoscale_max,
        autoscale_cooldown_s=args.cooldown,
        autoscale_interval_s=args.interval,
    )
    setup_logging("autoscaler", settings.log_level)
    actuator = make_actuator(args)
    try:
        asyncio.run(serve(settings, actuator))
    except KeyboardInterrupt:
        pass
    except ConnectionError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
