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
    config = MeshConfig(
        host=args.host, port=args.port, nats_url=args.nats_url, workflows=workflows, replicas=replicas, env=env
    )
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
        f"  API docs: {mesh.url}/docs    Ctrl-C stops everything.\n",
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


def cmd_demo(args: argparse.Namespace) -> int:
    """Start the mesh, generate one image through the REST API, stop: the whole system in one go."""
    port = args.port if _port_free(args.host, args.port) else free_port(args.host)
    mesh = Mesh(MeshConfig(host=args.host, port=port, workflows=[args.workflow]))
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


def _stage(status: dict) -> str:
    """What the request is doing now: a denoising bar, or the nodes running."""
    total = status.get("total_steps") or 0
    if total:
        done = status.get("step", 0)
        filled = int(24 * done / total)
        return f"denoising [{'#' * filled}{'.' * (24 - filled)}] {done}/{total}"
    nodes = status.get("nodes", {})
    return ",".join(n for n, s in nodes.items() if s == "running") or "queued"


def _lora(item: str) -> dict:
    name, _, scale = item.partition(":")
    if not name:
        raise ValueError(item)
    return {"name": name, "scale": float(scale) if scale else 1.0}


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
    answer: dict = {}

    def post() -> None:
        try:
            r = httpx.post(
                f"{args.url}/v1/images/generations",
                json=body,
                headers={"X-Request-Id": request_id},
                timeout=args.timeout,
            )
            answer["status"], answer["body"] = r.status_code, r.text
        except httpx.HTTPError as exc:
            answer["error"] = str(exc)

    started = time.monotonic()
    worker = threading.Thread(target=post, daemon=True)
    worker.start()
    tty = sys.stderr.isatty()
    shown = ""
    with httpx.Client(timeout=5) as client:
        while worker.is_alive():
            worker.join(0.25)
            if (tty or args.progress) and worker.is_alive():
                try:
                    status = client.get(f"{args.url}/v1/requests/{request_id}").json()
                except (httpx.HTTPError, ValueError):
                    continue
                stage = _stage(status)
                line = f"{stage:<40} {time.monotonic() - started:5.1f}s"
                if tty:
                    print(f"\r{line}", end="", file=sys.stderr, flush=True)
                elif stage != shown:  # not a terminal: one line per change of stage or step
                    shown = stage
                    print(line, file=sys.stderr, flush=True)
    if tty:
        print(file=sys.stderr)
    if "error" in answer:
        print(
            f"lego generate: cannot reach the gateway at {args.url}: {answer['error']} (is `lego up` running?)",
            file=sys.stderr,
        )
        return 1
    try:
        payload = json.loads(answer["body"])
    except ValueError:
        print(f"lego generate: HTTP {answer['status']}: {answer['body'][:300]}", file=sys.stderr)
        return 1
    if answer["status"] != 200:
        err = payload.get("error", {})
        print(f"lego generate: HTTP {answer['status']} {err.get('code')}: {err.get('message')}", file=sys.stderr)
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
        help="your weights: a diffusers SD3 directory, or a directory with sd3/, sd35-large/, flux/, "
        "controlnets/<id>/ and loras/<name>/ (default: tiny seeded models)",
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
        "model (sd3-transformer, sd35-large-transformer, flux-transformer); default 1 each",
    )
    up.add_argument(
        "--ready-timeout", type=float, default=300, help="seconds to wait for readiness (default: %(default)s)"
    )
    up.add_argument("--log-level", default="INFO", help="services' log level (default: %(default)s)")
    up.set_defaults(func=cmd_up)

    gen = sub.add_parser("generate", help="generate an image through the gateway's REST API")
    gen.add_argument("prompt", help="what to draw")
    gen.add_argument(
        "-o", "--output", default="out.png", help="PNG path; with --n > 1, -1, -2... are added (default: %(default)s)"
    )
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
    gen.add_argument("--timeout", type=float, default=600, help="seconds to wait (default: %(default)s)")
    gen.add_argument("--progress", action="store_true", help="show progress even when not on a terminal")
    gen.set_defaults(func=cmd_generate)

    demo = sub.add_parser("demo", help="start the mesh, generate one image through the REST API, stop")
    demo.add_argument("prompt", nargs="?", default="a lighthouse on a cliff at dawn, oil painting")
    demo.add_argument("-o", "--output", default="out/demo.png", help="PNG path (default: %(default)s)")
    demo.add_argument("--size", default="512x512", help="WIDTHxHEIGHT (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=20, help="denoising steps (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=42, help="seed (default: %(default)s)")
    demo.add_argument(
        "--workflow", default="sd3", help="text-to-image workflow; only its models start (default: %(default)s)"
    )
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
