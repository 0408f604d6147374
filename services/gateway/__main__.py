"""`python -m services.gateway`: the REST API on uvicorn."""

from __future__ import annotations

import argparse

import uvicorn

from services.gateway.app import create_app
from shared.logs import setup_logging
from shared.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m services.gateway",
        description="LegoDiffusion gateway: REST API that plans requests into steps on NATS JetStream.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="bind port (default: %(default)s)")
    parser.add_argument(
        "--nats-url", help="NATS server with JetStream (default: $LEGO_NATS_URL or nats://127.0.0.1:4222)"
    )
    parser.add_argument("--request-timeout", type=float, help="seconds before a request fails with 504 (default 300)")
    parser.add_argument(
        "--image-url-ttl",
        type=float,
        help="seconds an image link (response_format url) lives (default: $LEGO_IMAGE_URL_TTL_S or 3600)",
    )
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO)")
    args = parser.parse_args(argv)
    settings = Settings.from_env(
        nats_url=args.nats_url,
        request_timeout_s=args.request_timeout,
        image_url_ttl_s=args.image_url_ttl,
        log_level=args.log_level,
    )
    setup_logging("gateway", settings.log_level)
    if bool(settings.gateway_tls_cert) != bool(settings.gateway_tls_key):
        parser.error("HTTPS needs both LEGO_GATEWAY_TLS_CERT and LEGO_GATEWAY_TLS_KEY (or neither, for HTTP)")
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        log_config=None,
        ssl_certfile=settings.gateway_tls_cert or None,  # HTTPS when both are set
        ssl_keyfile=settings.gateway_tls_key or None,
    )


if __name__ == "__main__":
    main()
