"""`python -m services.gateway`: the REST API on uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
from types import FrameType

import uvicorn

from services.gateway.app import create_app
from services.gateway.draining import Drain
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
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        log_config=None,
        ssl_certfile=settings.gateway_tls_cert or None,  # HTTPS when both are set
        ssl_keyfile=settings.gateway_tls_key or None,
        timeout_graceful_shutdown=int(settings.drain_grace_s) + 5,
        loop="asyncio" if os.environ.get("LEGO_EVENT_LOOP") == "asyncio" else "auto",  # auto: uvloop
    )
    DrainingServer(config, app.state.drain).run()


class DrainingServer(uvicorn.Server):
    """uvicorn, but SIGTERM first drains the gateway (services/gateway/draining.py) while it
    still listens, so `/healthz` answers 503 draining, and only then shuts the server down.
    A second signal (or SIGINT) stops it as plain uvicorn does."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self.drain.draining or self._loop is None or not self.started:
            super().handle_exit(sig, frame)
            return
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain_then_exit(sig, frame)))

    async def _drain_then_exit(self, sig: int, frame: FrameType | None) -> None:
        await self.drain.run()
        super().handle_exit(sig, frame)


if __name__ == "__main__":
    main()
