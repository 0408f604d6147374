"""The `lego` command: `lego up` runs the mesh here; `lego generate` asks it for an image;
`lego status` shows replicas and scaling; `lego demo` does all three at once; `lego keys`
manages the API keys. This module
holds the flags (a function per command) and `demo`; each command has its module."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lego import keys, secrets_cmd
from lego.generate import cmd_generate
from lego.launcher import Mesh, MeshConfig, free_port
from lego.status import cmd_status
from lego.up import cmd_up, port_free
from shared.parallel_policy import MODES

DEFAULT_URL = "http://127.0.0.1:8000"


def cmd_demo(args: argparse.Namespace) -> int:
    """Start the mesh, generate one image through the REST API, stop: the whole system in one go."""
    port = args.port if port_free(args.host, args.port) else free_port(args.host)
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
                *(["--api-key", mesh.admin_key_file.read_text().strip()] if mesh.admin_key_file else []),
            ]
        )
        return cmd_generate(gen_args)
    except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
        print(f"lego demo: {exc}", file=sys.stderr)
        return 1
    finally:
        mesh.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lego", description="LegoDiffusion: diffusion workflows as a mesh of services."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_up(sub)
    _add_status(sub)
    _add_generate(sub)
    _add_demo(sub)
    keys.add_parser(sub, DEFAULT_URL)
    secrets_cmd.add_parser(sub)
    return parser


def _at_least_one(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: a whole number, 1 or more")
    return int(value)


def _add_up(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="start nats-server, every model service and the gateway on this machine")
    up.add_argument("--host", default="127.0.0.1", help="gateway bind address (default: %(default)s)")
    up.add_argument("--port", type=int, default=8000, help="gateway port (default: %(default)s)")
    up.add_argument(
        "--gateways",
        type=_at_least_one,
        default=1,
        metavar="N",
        help="gateway processes; with N > 1 each listens on a free port behind a local balancer on --port "
        "(lego/balancer.py: round robin per connection over the gateways whose /healthz answers 200, checked "
        "every 0.5 s; a draining (503) or dead one is out of rotation, a refused connection goes to the next; "
        "streams pass unbuffered). `lego status` lists them (default: %(default)s)",
    )
    up.add_argument(
        "--nats-url",
        help="use this NATS server (with JetStream) instead of starting one; the mesh connects as "
        "$LEGO_NATS_USER with $LEGO_NATS_PASSWORD_FILE (and $LEGO_NATS_TLS_CA) when set",
    )
    up.add_argument(
        "--nats-servers",
        type=int,
        choices=[1, 3],
        default=1,
        metavar="N",
        help="our own NATS: 1 nats-server, or 3 routed into a JetStream cluster (lego/nats_cluster.py) with "
        "every stream and bucket on all three (R3); each service and gateway gets the three URLs and fails "
        "over to a survivor, and a server that dies is started again; Ctrl-C stops all three; "
        "not with --nats-url (default: %(default)s)",
    )
    up.add_argument(
        "--nats-tls",
        action="store_true",
        help="serve our NATS over TLS (a CA and certificate made in the state dir; children verify with the CA)",
    )
    up.add_argument("--tls-cert", help="serve the gateway over HTTPS with this certificate chain (PEM)")
    up.add_argument("--tls-key", help="... and this private key (PEM)")
    up.add_argument(
        "--models-dir",
        help="your weights: a diffusers SD3 directory, or a directory with sd3/, sd35-large/, flux/, sd15/, sdxl/, "
        "controlnets/<id>/ and loras/<name>/ (default: tiny seeded models)",
    )
    up.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: $LEGO_DEVICE or cpu)")
    up.add_argument(
        "--gpus",
        type=int,
        default=1,
        metavar="N",
        help="place replicas over GPUs cuda:0..N-1, each where the least compute is committed "
        "(the autoscaler's placement rule); needs --device cuda (default: 1, every replica on --device)",
    )
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
        "--group",
        action="extend",
        nargs="+",
        default=[],
        metavar="UNIT=K",
        help="run each replica of a denoiser unit as a parallel group of K devices (1, 2 or 4): GPUs "
        "cuda:0..K-1, or K CPU processes; it holds K model copies and may split one request over them, "
        "e.g. sd3-transformer=2; repeatable; a replica, and what the autoscaler adds, is a whole group "
        "(default: $LEGO_DENOISE_GROUP_SIZE or 1)",
    )
    up.add_argument(
        "--parallel-mode",
        choices=MODES,
        help="how a group splits requests: adaptive (a lone request over the idle devices, one device each "
        "under load), never (one device a request), always (as far as a request can be split) "
        "(default: $LEGO_PARALLEL_MODE or adaptive)",
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
    up.add_argument(
        "--no-auth",
        action="store_true",
        help="DANGEROUS: no API keys; anyone who reaches the gateway may generate and manage it (default: keys "
        "on, the admin key in <state dir>/admin.key)",
    )
    up.set_defaults(func=cmd_up)


def _add_status(sub: argparse._SubParsersAction) -> None:
    st = sub.add_parser(
        "status", help="gateways, replicas, backlogs and the autoscaler's latest decisions (GET /v1/status)"
    )
    st.add_argument("--url", default=DEFAULT_URL, help="gateway URL (default: %(default)s)")
    st.add_argument("--json", action="store_true", help="print the JSON as the gateway answers it")
    keys.add_api_key_flag(st)
    st.set_defaults(func=cmd_status)


def _add_generate(sub: argparse._SubParsersAction) -> None:
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
    keys.add_api_key_flag(gen)
    gen.set_defaults(func=cmd_generate)


def _add_demo(sub: argparse._SubParsersAction) -> None:
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


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
