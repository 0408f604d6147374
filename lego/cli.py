"""The `lego` command: `lego up` runs the mesh here; `lego generate` asks it for an image."""

from __future__ import annotations

import argparse
import base64
import json
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx

from lego.launcher import Mesh, MeshConfig, free_port, plan_units

DEFAULT_URL = "http://127.0.0.1:8000"


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


def cmd_up(args: argparse.Namespace) -> int:
    try:
        workflows = _workflows(args.workflows)
        replicas = _replicas(args.replicas, workflows)
    except argparse.ArgumentTypeError as exc:
        print(f"lego up: {exc}", file=sys.stderr)
        return 2
    if not _port_free(args.host, args.port):
        print(f"lego up: {args.host}:{args.port} is in use; stop what holds it or pass --port", file=sys.stderr)
        return 1
    env = {"LEGO_LOG_LEVEL": args.log_level}
    if args.models_dir:
        env["LEGO_MODELS_DIR"] = str(Path(args.models_dir).resolve())
    if args.device:
        env["LEGO_DEVICE"] = args.device
    if args.dtype:
        env["LEGO_DTYPE"] = args.dtype
    try:
        env.update(_autoscale_env(args, replicas))
    except ValueError as exc:
        print(f"lego up: {exc}", file=sys.stderr)
        return 2
    config = MeshConfig(
        host=args.host,
        port=args.port,
        nats_url=args.nats_url,
        workflows=workflows,
        replicas=replicas,
        env=env,
        autoscale=not args.no_autoscale,
    )
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
    print(
        f"\nLegoDiffusion is up at {mesh.url}  (NATS {mesh.nats_url})\n"
        f'  lego generate "a red fox in the snow" -o fox.png --url {mesh.url}\n'
        f"  curl -s {mesh.url}/v1/images/generations -H 'content-type: application/json' \\\n"
        f'       -d \'{{"prompt": "a red fox", "size": "256x256"}}\'\n'
        f"  API docs: {mesh.url}/docs    Ctrl-C stops everything.\n"
        + (
            f"  Autoscaling: replicas per unit {env['LEGO_AUTOSCALE_MIN']}..{env['LEGO_AUTOSCALE_MAX']}, "
            f"SLO {env['LEGO_AUTOSCALE_SLO']}; `lego status --url {mesh.url}` shows it.\n"
            if config.autoscale
            else "  Autoscaling: off (--no-autoscale).\n"
        ),
        flush=True,
    )
    try:
        while not stopping.wait(1.0):
            for name in mesh.restart_dead():
                print(f"lego: {name} exited unexpectedly; restarted it", file=sys.stderr, flush=True)
    finally:
        print("lego: stopping", file=sys.stderr, flush=True)
        mesh.stop()
    return 0


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


def cmd_status(args: argparse.Namespace) -> int:
    """Print the gateway's GET /v1/status: replicas and backlog per unit, the latest decisions."""
    try:
        r = httpx.get(f"{args.url}/v1/status", timeout=10)
        r.raise_for_status()
        status = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        print(f"lego status: cannot read {args.url}/v1/status: {exc} (is `lego up` running?)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(format_status(status))
    return 0


def format_status(status: dict) -> str:
    """Tables: units (from the autoscaler), consumers (backlog per kind/model), decisions."""
    lines = []
    scaler = status.get("autoscaler")
    if scaler:
        lines.append(f"autoscaler: {scaler['actuator']} actuator, SLO {scaler['slo']}")
        rows = [("UNIT", "REPLICAS", "LIVE", "WANTS", "MIN..MAX", "BACKLOG", "RATE/S", "STEP S", "MEM MIB")]
        for u in scaler["units"]:
            rows.append(
                (
                    u["unit"],
                    str(u["replicas"]),
                    str(u["live"]),
                    str(u["desired"]),
                    f"{u['min_replicas']}..{u['max_replicas']}",
                    str(u["backlog"]),
                    f"{u['arrival_rate']:.2f}",
                    f"{u['seconds_per_item']:.3f}",
                    f"{u['memory_bytes'] / 2**20:.0f}",
                )
            )
        lines += _table(rows)
    else:
        lines.append("autoscaler: not running (lego up --no-autoscale, or none deployed)")
    lines.append("")
    rows = [("KIND", "MODEL", "REPLICAS", "PENDING", "ACK PENDING", "BACKLOG")]
    for c in status.get("consumers", []):
        rows.append(
            (c["kind"], c["model_id"], str(c["replicas"]), str(c["pending"]), str(c["ack_pending"]), str(c["backlog"]))
        )
    lines += _table(rows)
    decisions = (scaler or {}).get("decisions") or []
    if decisions:
        lines += ["", "latest decisions:"]
        for d in decisions[-10:]:
            when = time.strftime("%H:%M:%S", time.localtime(d["at"]))
            lines.append(f"  {when} {d['unit']} {d['from_replicas']} -> {d['to_replicas']}: {d['reason']}")
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def cmd_demo(args: argparse.Namespace) -> int:
    """Start the mesh, generate one image through the REST API, stop: the whole system in one go."""
    port = args.port if _port_free(args.host, args.port) else free_port(args.host)
    mesh = Mesh(MeshConfig(host=args.host, port=port))
    try:
        mesh.start(ready_timeout_s=args.ready_timeout)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        gen_args = build_parser().parse_args(
            [
                "generate",
                args.prompt,
                "-o",
                args.output,
                "--size",
                args.size,
                "--seed",
                str(args.seed),
                "--steps",
                str(args.steps),
                "--url",
                mesh.url,
                "--workflow",
                args.workflow,
                "--progress",
            ]
        )
        return cmd_generate(gen_args)
    except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
        print(f"lego demo: {exc}", file=sys.stderr)
        return 1
    finally:
        mesh.stop()


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class _Refused(Exception):
    """The gateway refused or failed the request; the message says why."""


def _refusal(status: int, text: str) -> _Refused:
    try:
        err = json.loads(text).get("error", {})
        return _Refused(f"HTTP {status} {err.get('code')}: {err.get('message')}")
    except (ValueError, AttributeError):
        return _Refused(f"HTTP {status}: {text[:300]}")


def _follow(args: argparse.Namespace, body: dict, request_id: str, show: bool, tty: bool, started: float) -> dict:
    """Submit in async mode, then follow the request's server-sent events to its answer,
    drawing a progress bar from the `progress` events."""
    with httpx.Client(timeout=httpx.Timeout(30, read=args.timeout)) as client:
        r = client.post(f"{args.url}/v1/images/generations", json=body, headers={"X-Request-Id": request_id})
        if r.status_code == 200:  # answered at once
            return r.json()
        if r.status_code != 202:
            raise _refusal(r.status_code, r.text)
        shown = ""
        with client.stream("GET", f"{args.url}{r.json()['events_url']}") as events:
            kind = ""
            for line in events.iter_lines():
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                if not line.startswith("data: "):
                    continue
                event = json.loads(line.removeprefix("data: "))
                if kind == "result":
                    if tty and shown:
                        print(file=sys.stderr)
                    return event
                if kind == "error":
                    if tty and shown:
                        print(file=sys.stderr)
                    raise _Refused(f"{event.get('code')}: {event.get('message')}")
                stage = _event_stage(event)
                if show and stage and stage != shown:
                    shown = stage
                    line_out = f"{stage:<40} {time.monotonic() - started:5.1f}s"
                    print(f"\r{line_out}" if tty else line_out, end="" if tty else "\n", file=sys.stderr, flush=True)
    raise _Refused("the event stream ended before the result; see GET /v1/requests/" + request_id)


def _event_stage(event: dict) -> str:
    if event.get("type") == "progress":
        done, total = event["step"], event["total"]
        filled = int(24 * done / total) if total else 0
        return f"denoising [{'#' * filled}{'.' * (24 - filled)}] {done}/{total}"
    if event.get("type") == "node" and event.get("state") == "running":
        return f"running {event['node']}"
    if event.get("type") == "queued":
        return "queued"
    return ""


def _lora(item: str) -> dict:
    name, _, scale = item.partition(":")
    if not name:
        raise ValueError(item)
    return {"name": name, "scale": float(scale) if scale else 1.0}


SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def cmd_generate(args: argparse.Namespace) -> int:
    request_id = uuid.uuid4().hex
    body: dict = {"prompt": args.prompt, "size": args.size, "n": args.n, "guidance_scale": args.guidance}
    for key, value in (
        ("workflow", args.workflow),
        ("num_inference_steps", args.steps),
        ("seed", args.seed),
        ("negative_prompt", args.negative),
    ):
        if value is not None:
            body[key] = value
    fmt = SUFFIX_FORMATS.get(Path(args.output).suffix.lower())
    if fmt is None:
        print(f"lego generate: -o must end in {', '.join(SUFFIX_FORMATS)} (it picks the format)", file=sys.stderr)
        return 2
    body["output_format"] = fmt
    if args.quality is not None:
        if fmt == "png":
            print("lego generate: --quality applies to .jpg and .webp outputs; png is lossless", file=sys.stderr)
            return 2
        body["output_quality"] = args.quality
    if args.control_image:
        try:
            image = base64.b64encode(Path(args.control_image).read_bytes()).decode()
        except OSError as exc:
            print(f"lego generate: cannot read --control-image: {exc}", file=sys.stderr)
            return 2
        body["controlnet"] = {"image": image, "conditioning_scale": args.conditioning_scale}
    if args.lora:
        try:
            body["loras"] = [_lora(item) for item in args.lora]
        except ValueError:
            print("lego generate: --lora takes NAME or NAME:SCALE, e.g. sd3-lora-a:0.8", file=sys.stderr)
            return 2
    body["wait"] = False
    body["timeout_s"] = min(args.timeout, 3600)  # the gateway's deadline too: it refuses what cannot make it
    started = time.monotonic()
    tty = sys.stderr.isatty()
    try:
        payload = _follow(args, body, request_id, show=tty or args.progress, tty=tty, started=started)
    except httpx.HTTPError as exc:
        print(f"lego generate: cannot reach the gateway at {args.url}: {exc} (is `lego up` running?)", file=sys.stderr)
        return 1
    except _Refused as exc:
        print(f"lego generate: {exc}", file=sys.stderr)
        return 1
    out = Path(args.output)
    images = payload["data"]
    paths = (
        [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(len(images))]
    )
    for path, item in zip(paths, images, strict=True):
        path.write_bytes(base64.b64decode(item["b64_json"]))
    print(
        f"wrote {', '.join(map(str, paths))}  (workflow {payload['workflow']}, seed {payload['seed']}, "
        f"{time.monotonic() - started:.2f}s)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lego", description="LegoDiffusion: diffusion workflows as a mesh of services."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start nats-server, every model service and the gateway on this machine")
    up.add_argument("--host", default="127.0.0.1", help="gateway bind address (default: %(default)s)")
    up.add_argument("--port", type=int, default=8000, help="gateway port (default: %(default)s)")
    up.add_argument("--nats-url", help="use this NATS server (with JetStream) instead of starting one")
    up.add_argument(
        "--models-dir",
        help="your weights: a diffusers SD3 directory, or a directory with sd3/, sd35-large/, flux/, sd15/, sdxl/, "
        "controlnets/<id>/ and loras/<name>/ (default: tiny seeded models)",
    )
    up.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: $LEGO_DEVICE or cpu)")
    up.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="weights' dtype; auto: bfloat16 on a GPU, float32 on the CPU (default: $LEGO_DTYPE or auto)",
    )
    up.add_argument(
        "--workflows",
        default="all",
        help="comma-separated workflows to serve; only their models are loaded (default: all)",
    )
    up.add_argument(
        "--replicas",
        nargs="*",
        default=[],
        metavar="UNIT=N",
        help="replicas per unit, e.g. sd3-transformer=2; units: encoder, vae, adapters and one per base "
        "model (sd3-transformer, sd35-large-transformer, flux-transformer, sd15-unet, sdxl-unet); default 1 each",
    )
    up.add_argument(
        "--ready-timeout", type=float, default=300, help="seconds to wait for readiness (default: %(default)s)"
    )
    up.add_argument("--log-level", default="INFO", help="services' log level (default: %(default)s)")
    up.add_argument(
        "--no-autoscale", action="store_true", help="keep the replica counts fixed (default: autoscale each unit)"
    )
    up.add_argument(
        "--min",
        help="autoscaling: replicas at least, N or N,UNIT=N,... (default: $LEGO_AUTOSCALE_MIN or 1; "
        "--replicas U=N raises U's to N)",
    )
    up.add_argument(
        "--max", help="autoscaling: replicas at most, N or N,UNIT=N,... (default: $LEGO_AUTOSCALE_MAX or 3)"
    )
    up.add_argument(
        "--slo", help="autoscaling: latency SLO, '5x' (times the solo latency) or seconds, e.g. '10s' (default 5x)"
    )
    up.add_argument("--cooldown", type=float, help="autoscaling: seconds a unit must want fewer before it shrinks (30)")
    up.add_argument("--scale-interval", type=float, help="autoscaling: seconds between decisions (default 1)")
    up.set_defaults(func=cmd_up)

    st = sub.add_parser("status", help="replicas, backlogs and the autoscaler's latest decisions (GET /v1/status)")
    st.add_argument("--url", default=DEFAULT_URL, help="gateway URL (default: %(default)s)")
    st.add_argument("--json", action="store_true", help="print the JSON as the gateway answers it")
    st.set_defaults(func=cmd_status)

    gen = sub.add_parser("generate", help="generate an image through the gateway's REST API")
    gen.add_argument("prompt", help="what to draw")
    gen.add_argument(
        "-o",
        "--output",
        default="out.png",
        help="image path; .png, .jpg or .webp picks the format; with --n > 1, -1, -2... are added "
        "(default: %(default)s)",
    )
    gen.add_argument("--quality", type=int, help="for .jpg / .webp: 1-100 (default: the server's, 90)")
    gen.add_argument("--workflow", help="catalogue workflow (default: the server's, sd3)")
    gen.add_argument("--size", default="512x512", help="WIDTHxHEIGHT, multiples of 16 (default: %(default)s)")
    gen.add_argument("--steps", type=int, help="denoising steps (default: the server's, 28)")
    gen.add_argument("--seed", type=int, help="seed for a reproducible image (default: random)")
    gen.add_argument("--guidance", type=float, default=7.0, help="guidance scale (default: %(default)s)")
    gen.add_argument("--negative", help="negative prompt")
    gen.add_argument("--n", type=int, default=1, help="number of images (default: %(default)s)")
    gen.add_argument("--control-image", help="PNG/JPEG of the requested size, for *-controlnet workflows")
    gen.add_argument("--conditioning-scale", type=float, default=1.0, help="ControlNet strength (default: %(default)s)")
    gen.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME[:SCALE]",
        help="a LoRA for *-lora workflows, repeatable (default: the workflow's default LoRA)",
    )
    gen.add_argument("--url", default=DEFAULT_URL, help="gateway URL (default: %(default)s)")
    gen.add_argument(
        "--timeout",
        type=float,
        default=600,
        help="seconds the request may take, waited here and sent as its deadline; with more work queued "
        "than that, the gateway refuses at once (HTTP 429) (default: %(default)s)",
    )
    gen.add_argument("--progress", action="store_true", help="show progress even when not on a terminal")
    gen.set_defaults(func=cmd_generate)

    demo = sub.add_parser("demo", help="start the mesh, generate one image through the REST API, stop")
    demo.add_argument("prompt", nargs="?", default="a lighthouse on a cliff at dawn, oil painting")
    demo.add_argument("-o", "--output", default="out/demo.png", help="PNG path (default: %(default)s)")
    demo.add_argument("--size", default="512x512", help="WIDTHxHEIGHT (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=20, help="denoising steps (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=42, help="seed (default: %(default)s)")
    demo.add_argument("--workflow", default="sd3", help="the workflow that draws the image (default: %(default)s)")
    demo.add_argument("--host", default="127.0.0.1", help="gateway bind address (default: %(default)s)")
    demo.add_argument("--port", type=int, default=8000, help="gateway port; a free one if taken (default: %(default)s)")
    demo.add_argument("--ready-timeout", type=float, default=300, help="seconds to wait for readiness")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
