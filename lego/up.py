"""`lego up`: the whole mesh on this machine, in the foreground, until Ctrl-C."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from lego.launcher import Mesh, MeshConfig, plan_units
from lego.units import GROUP_SIZES, check_groups


def _workflows(value: str | None) -> list[str] | None:
    from shared.workflows.catalogue import catalogue

    if not value or value == "all":
        return None
    names = [w.strip() for w in value.split(",") if w.strip()]
    unknown = [w for w in names if w not in catalogue()]
    if unknown:
        raise argparse.ArgumentTypeError(f"--workflows: unknown {unknown}; known: all, {', '.join(catalogue())}")
    return names


def _replicas(values: list[str], workflows: list[str] | None) -> dict[str, int]:
    units = [u.name for u in plan_units(workflows)]
    replicas = {}
    for item in values:
        name, _, count = item.partition("=")
        if name not in units or not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(f"--replicas {item!r}: use UNIT=N with UNIT in {units}, N >= 1")
        replicas[name] = int(count)
    return replicas


def _groups(values: list[str], workflows: list[str] | None) -> dict[str, int]:
    """`--group UNIT=K` flags -> {unit: K}, each a denoiser unit of the plan and K in GROUP_SIZES."""
    units = plan_units(workflows)
    denoisers = [u.name for u in units if u.service == "denoiser"]
    sizes = ", ".join(map(str, GROUP_SIZES))
    groups = {}
    for item in values:
        name, _, size = item.partition("=")
        if not size.isdigit():
            raise argparse.ArgumentTypeError(f"--group {item!r}: use UNIT=K with UNIT in {denoisers}, K in {sizes}")
        groups[name] = int(size)
    try:
        check_groups(groups, units)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--{exc}") from None
    return groups


def cmd_up(args: argparse.Namespace) -> int:
    try:
        workflows = _workflows(args.workflows)
        replicas = _replicas(args.replicas, workflows)
        groups = _groups(args.group, workflows)
    except argparse.ArgumentTypeError as exc:
        print(f"lego up: {exc}", file=sys.stderr)
        return 2
    if args.gpus < 1 or (args.gpus > 1 and (args.device or os.environ.get("LEGO_DEVICE", "")) != "cuda"):
        print(
            f"lego up: --gpus {args.gpus} places replicas over cuda:0..N-1: pass N >= 1 with --device cuda",
            file=sys.stderr,
        )
        return 2
    if args.nats_servers > 1 and args.nats_url:
        print("lego up: --nats-servers starts our own NATS cluster; --nats-url uses yours: pass one", file=sys.stderr)
        return 2
    if not port_free(args.host, args.port):
        print(f"lego up: {args.host}:{args.port} is in use; stop what holds it or pass --port", file=sys.stderr)
        return 1
    try:
        env = _services_env(args, replicas)
    except ValueError as exc:
        print(f"lego up: {exc}", file=sys.stderr)
        return 2
    config = MeshConfig(
        host=args.host,
        port=args.port,
        gateways=args.gateways,
        nats_url=args.nats_url,
        nats_servers=args.nats_servers,
        workflows=workflows,
        replicas=replicas,
        groups=groups,
        parallel_mode=args.parallel_mode,
        env=env,
        autoscale=not args.no_autoscale,
        auth=not args.no_auth,
        nats_tls=args.nats_tls,
        gpus=args.gpus,
    )
    if args.no_auth:
        print(NO_AUTH_WARNING, file=sys.stderr, flush=True)
    if config.autoscale:  # its decisions are log lines of this process
        from shared.logs import setup_logging

        setup_logging("autoscaler", args.log_level)
    mesh = Mesh(config)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        mesh.start(ready_timeout_s=args.ready_timeout)
    except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
        print(f"lego up: {exc}", file=sys.stderr)
        return 1
    print(_banner(mesh, env, config.autoscale), flush=True)
    try:
        while not stopping.wait(1.0):
            for name in mesh.restart_dead():
                print(f"lego: {name} exited unexpectedly; restarted it", file=sys.stderr, flush=True)
    finally:
        print("lego: stopping", file=sys.stderr, flush=True)
        mesh.stop()
    return 0


def _services_env(args: argparse.Namespace, replicas: dict[str, int]) -> dict[str, str]:
    """The environment every process of the mesh starts with: the flags as LEGO_* settings."""
    env = {"LEGO_LOG_LEVEL": args.log_level}
    if args.models_dir:
        env["LEGO_MODELS_DIR"] = str(Path(args.models_dir).resolve())
    if args.device:
        env["LEGO_DEVICE"] = args.device
    if args.dtype:
        env["LEGO_DTYPE"] = args.dtype
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together (the gateway's HTTPS certificate and its key)")
    if args.tls_cert:
        for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
            if not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file")
        env["LEGO_GATEWAY_TLS_CERT"] = str(Path(args.tls_cert).resolve())
        env["LEGO_GATEWAY_TLS_KEY"] = str(Path(args.tls_key).resolve())
    env.update(_autoscale_env(args, replicas))
    return env


NO_AUTH_WARNING = (
    "lego up: WARNING: --no-auth: the gateway takes NO API keys. Anyone who can reach it may generate "
    "images, cancel others' requests and read the mesh's state. Use it only on a machine and network you trust."
)


def _auth_banner(mesh: Mesh) -> str:
    """The banner's API key lines: the admin key itself only at the first start (it was just made)."""
    path = mesh.admin_key_file
    if path is None:
        return "  API keys: OFF (--no-auth): anyone who reaches this port may use every route.\n"
    if mesh.admin_key_made:
        return (
            f"  Admin API key (shown once; kept in {path}, mode 0600):\n      {path.read_text().strip()}\n"
            "  `lego keys create NAME` makes keys for others; lego commands here send the admin key.\n"
        )
    return f"  Admin API key: in {path} (`lego keys create NAME` makes keys for others).\n"


def _banner(mesh: Mesh, env: dict[str, str], autoscale: bool) -> str:
    """What `lego up` prints once ready: where it is and how to use it."""
    auth = f' -H "Authorization: Bearer $(cat {mesh.admin_key_file})"' if mesh.admin_key_file else ""
    return (
        f"\nLegoDiffusion is up at {mesh.url}  (NATS {mesh.nats_url})\n"
        + _nats_banner(mesh)
        + _gateways_banner(mesh)
        + f'  lego generate "a red fox in the snow" -o fox.png --url {mesh.url}\n'
        f"  curl -s {mesh.url}/v1/images/generations -H 'content-type: application/json'{auth} \\\n"
        f'       -d \'{{"prompt": "a red fox", "size": "256x256"}}\'\n'
        f"  API docs: {mesh.url}/docs    Ctrl-C stops everything.\n"
        + _auth_banner(mesh)
        + _groups_banner(mesh)
        + (
            f"  Autoscaling: replicas per unit {env['LEGO_AUTOSCALE_MIN']}..{env['LEGO_AUTOSCALE_MAX']}, "
            f"SLO {env['LEGO_AUTOSCALE_SLO']}; `lego status --url {mesh.url}` shows it.\n"
            if autoscale
            else "  Autoscaling: off (--no-autoscale).\n"
        )
    )


def _nats_banner(mesh: Mesh) -> str:
    """A line on our NATS cluster, when `--nats-servers` started one."""
    cluster = mesh.nats_cluster
    if cluster is None:
        return ""
    size = len(cluster.nodes)
    return f"  NATS: {size} routed nats-servers, every stream and bucket R{size}; the mesh survives losing one.\n"


def _gateways_banner(mesh: Mesh) -> str:
    """A line naming the gateways behind the balancer, when there are several."""
    if len(mesh.front_urls) < 2:
        return ""
    ports = ", ".join(str(p) for p in mesh.gateway_ports.values())
    return f"  {len(mesh.gateway_ports)} gateways (ports {ports}) behind a local balancer on {mesh.url}.\n"


def _groups_banner(mesh: Mesh) -> str:
    """A line naming the units whose replicas are parallel groups, if any."""
    groups = mesh.group_sizes()
    if not groups:
        return ""
    mode = mesh.config.parallel_mode or mesh.settings().parallel_mode
    units = ", ".join(f"{name} x{k}" for name, k in sorted(groups.items()))
    return f"  Parallel groups (devices a replica): {units}; requests split: {mode}.\n"


def _autoscale_env(args: argparse.Namespace, replicas: dict[str, int]) -> dict[str, str]:
    """LEGO_AUTOSCALE_* for the embedded autoscaler: flags win over the environment; a unit
    started with --replicas U=N keeps at least N."""
    import os

    from services.autoscaler.policy import Slo, parse_limits

    def pick(flag: object, name: str, default: str) -> str:
        return str(flag) if flag is not None else os.environ.get(name, default)

    low, low_units = parse_limits(pick(args.min, "LEGO_AUTOSCALE_MIN", "1"), 1)
    high, high_units = parse_limits(pick(args.max, "LEGO_AUTOSCALE_MAX", "3"), 3)
    low_units.update({u: max(n, low_units.get(u, low)) for u, n in replicas.items()})
    slo = pick(args.slo, "LEGO_AUTOSCALE_SLO", "5x")
    Slo.parse(slo)
    env = {
        "LEGO_AUTOSCALE_MIN": ",".join([str(low), *(f"{u}={n}" for u, n in sorted(low_units.items()))]),
        "LEGO_AUTOSCALE_MAX": ",".join([str(high), *(f"{u}={n}" for u, n in sorted(high_units.items()))]),
        "LEGO_AUTOSCALE_SLO": slo,
    }
    if args.cooldown is not None:
        env["LEGO_AUTOSCALE_COOLDOWN_S"] = str(args.cooldown)
    if args.scale_interval is not None:
        env["LEGO_AUTOSCALE_INTERVAL_S"] = str(args.scale_interval)
    return env


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
