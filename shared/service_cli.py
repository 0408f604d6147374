"""The command line every model service shares: `python -m services.<name> --models ... --device ...`."""

from __future__ import annotations

import argparse
import os

from shared.model_runner import ServiceSpec
from shared.settings import Settings
from shared.tensor_plane.plane import TRANSPORTS


def build_parser(spec: ServiceSpec) -> argparse.ArgumentParser:
    """The flags; each one but --models is named after the setting it overrides (`Settings.from_flags`)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {spec.entry_point}",
        description=spec.description,
        epilog="Every flag also reads an environment variable (LEGO_NATS_URL, LEGO_DEVICE, ...).",
    )
    parser.add_argument(
        "--models",
        default=os.environ.get(f"LEGO_{spec.name.upper()}_MODELS", ",".join(spec.default_models)),
        help="comma-separated model ids this process hosts (default: %(default)s)",
    )
    parser.add_argument(
        "--nats-url", help="NATS server with JetStream (default: $LEGO_NATS_URL or nats://127.0.0.1:4222)"
    )
    parser.add_argument("--device", help="torch device (default: $LEGO_DEVICE or cpu)")
    parser.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="weights' dtype; auto: bfloat16 on a GPU, float32 on the CPU (default: $LEGO_DTYPE or auto)",
    )
    parser.add_argument("--models-dir", help="local diffusers SD3 directory; default: tiny seeded models")
    parser.add_argument("--transport", choices=list(TRANSPORTS), help="force one tensor transport (default: auto)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO)")
    return parser


def parse_args(spec: ServiceSpec, argv: list[str] | None = None) -> tuple[Settings, list[str]]:
    """The settings (environment, then flags) and the model ids this process hosts."""
    parser = build_parser(spec)
    args = parser.parse_args(argv)
    settings = Settings.from_flags(args)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        parser.error("--models is empty: name at least one model id")
    return settings, models
