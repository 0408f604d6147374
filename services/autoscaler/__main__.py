"""`python -m services.autoscaler --actuator kubernetes|compose`: the autoscaler as its own process.

The local actuator runs inside `lego up` (which owns the processes it scales), not here.
"""

from __future__ import annotations

import argparse
import logging

from services.autoscaler.actuators import ACTUATORS, Actuator
from services.autoscaler.controller import Autoscaler, policy_config
from services.autoscaler.signals import Observer
from shared.bus import Bus
from shared.lifecycle import run_until_stopped, stop_on_signals
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
    # Flags named after a setting (dest) override it: Settings.from_flags.
    parser.add_argument(
        "--slo",
        dest="autoscale_slo",
        metavar="SLO",
        help="latency SLO: '5x' (times the solo latency) or seconds, e.g. '12s' (default 5x)",
    )
    parser.add_argument("--min", dest="autoscale_min", help="replicas at least: N, or N,UNIT=N,... (default 1)")
    parser.add_argument("--max", dest="autoscale_max", help="replicas at most: N, or N,UNIT=N,... (default 3)")
    parser.add_argument(
        "--cooldown",
        type=float,
        dest="autoscale_cooldown_s",
        metavar="COOLDOWN",
        help="seconds a unit must want fewer before it shrinks (default 30)",
    )
    parser.add_argument(
        "--interval",
        type=float,
        dest="autoscale_interval_s",
        metavar="INTERVAL",
        help="seconds between decisions (default 1)",
    )
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
    stop = stop_on_signals()
    bus = Bus(settings, name="autoscaler")
    await bus.connect()
    try:
        config = policy_config(settings)
        observer = Observer.for_policy(bus, config, settings.autoscale_window_s)
        autoscaler = Autoscaler(observer, actuator, config, interval_s=settings.autoscale_interval_s)
        await autoscaler.run(stop)
    finally:
        await bus.close()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    settings = Settings.from_flags(args)
    setup_logging("autoscaler", settings.log_level)
    actuator = make_actuator(args)
    run_until_stopped(serve(settings, actuator), log)


if __name__ == "__main__":
    main()
