"""The locked bus, against a real nats-server with TLS and a user per role (as `lego up` runs it):
who gets in, what each role may not do, and the gateway serving HTTPS with the same CA."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path

import httpx
import nats
import pytest
from nats.js import api

from lego import nats_secrets
from lego.processes import free_port, start_nats_server
from lego.tls_certs import CertFiles, make_certificates
from shared import subjects
from shared.bus import Bus
from shared.settings import Settings

DENIED_S = 2.0  # a refused JetStream request goes unanswered: the client gives up after this


class LockedNats:
    def __init__(self, url: str, secrets: Path, certs: CertFiles) -> None:
        self.url, self.secrets, self.certs = url, secrets, certs

    def settings(self, role: str = "", password_of: str = "", ca: bool = True) -> Settings:
        password_file = str(self.secrets / f"{password_of or role}.password") if role else ""
        return Settings(
            nats_url=self.url,
            nats_user=role,
            nats_password_file=password_file,
            nats_tls_ca=str(self.certs.ca) if ca else "",
        )


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LockedNats]:
    root = tmp_path_factory.mktemp("locked-nats")
    certs = make_certificates(root / "tls")
    secrets = root / "nats"
    config = nats_secrets.write_server_config(
        root / "nats-server.conf", secrets, nats_secrets.ServerTls(certs.cert, certs.key)
    )
    child, url = start_nats_server(root / "js", root / "nats.log", config, tls=True)
    try:
        yield LockedNats(url, secrets, certs)
    finally:
        child.signal_group(signal.SIGKILL)
        child.proc.wait(timeout=10)


async def _connected(settings: Settings, name: str) -> Bus:
    bus = Bus(settings, name=name)
    await bus.connect(timeout_s=5)
    bus._js = bus.nc.jetstream(timeout=DENIED_S)
    return bus


async def _refused(request: Awaitable[object]) -> None:
    """The bus refuses it: a JetStream request the server denies goes unanswered (a timeout)."""
    with pytest.raises((nats.errors.TimeoutError, TimeoutError)):
        await request


async def _as_admin(locked: LockedNats) -> Bus:
    bus = await _connected(locked.settings("admin"), "test-admin")
    await bus.ensure_streams()
    return bus


def test_secrets_are_owner_only_and_the_config_holds_no_password(locked: LockedNats) -> None:
    for path in locked.secrets.glob("*.password"):
        assert path.stat().st_mode & 0o777 == 0o600
    config = (locked.secrets.parent / "nats-server.conf").read_text()
    assert all(p.read_text().strip() not in config for p in locked.secrets.glob("*.password"))
    assert "$2" in config  # bcrypt hashes


async def test_a_service_waits_for_the_streams_and_buckets_it_may_not_make(locked: LockedNats) -> None:
    """First in this module: nothing exists yet. The encoder may not create streams or buckets,
    so it waits, and carries on once a role that may (here admin) has made them."""
    from shared.presence import ensure_buckets, presence_bucket

    encoder = await _connected(locked.settings("encoder"), "test-encoder-waits")
    admin = None
    try:
        waiting = asyncio.ensure_future(asyncio.gather(encoder.ensure_streams(), presence_bucket(encoder)))
        done, _ = await asyncio.wait([waiting], timeout=1.5)
        assert not done, "the encoder went on without the streams (or made them itself)"
        admin = await _as_admin(locked)
        await ensure_buckets(admin)
        _, kv = await asyncio.wait_for(waiting, 30)
        assert (await kv.status()).bucket == subjects.PRESENCE_BUCKET
    finally:
        await encoder.close()
        if admin is not None:
            await admin.close()


def test_no_credentials_or_a_wrong_password_is_refused(locked: LockedNats) -> None:
    with pytest.raises(PermissionError, match="refused user"):
        asyncio.run(_connected(locked.settings(), "anonymous"))
    with pytest.raises(PermissionError, match="refused user encoder"):
        asyncio.run(_connected(locked.settings("encoder", password_of="gateway"), "impostor"))


def test_tls_connects_with_the_ca_and_not_without_it(locked: LockedNats) -> None:
    async def main() -> None:
        bus = await _connected(locked.settings("admin"), "with-ca")
        assert bus.nc.is_connected
        await bus.close()
        with pytest.raises(ConnectionError):  # the server's certificate is not trusted
            await Bus(locked.settings("admin", ca=False), name="no-ca").connect(timeout_s=3)

    asyncio.run(main())


def test_an_encoder_may_not_publish_a_denoise_step_nor_touch_streams_nor_read_keys(locked: LockedNats) -> None:
    async def main() -> None:
        admin = await _as_admin(locked)
        keys = await admin.js.create_key_value(bucket=subjects.KEYS_BUCKET)
        await keys.put("some-key", b"admin")
        encoder = await _connected(locked.settings("encoder"), "encoder")
        try:
            await encoder.ensure_streams()  # waits for them: fine, they exist
            await encoder.ensure_consumer("encode", "clip-l")  # its own kind: allowed
            # Each refused request goes unanswered until DENIED_S: all at once, one wait for the five.
            await asyncio.gather(
                _refused(encoder.js.publish(subjects.step_subject("denoise", "sd3-transformer"), b"{}")),
                _refused(encoder.ensure_consumer("denoise", "sd3-transformer")),
                _refused(encoder.js.delete_stream(subjects.STEP_STREAM)),
                _refused(encoder.js.update_stream(api.StreamConfig(name=subjects.STEP_STREAM, subjects=["lego.>"]))),
                _refused(
                    encoder.js.get_msg(subjects.kv_stream(subjects.KEYS_BUCKET), subject="$KV.LEGO_KEYS.some-key")
                ),
            )
            heard: list[bytes] = []

            async def on_key(msg: nats.aio.msg.Msg) -> None:
                heard.append(msg.data)

            await encoder.nc.subscribe(subjects.kv_subject(subjects.KEYS_BUCKET), cb=on_key)
            await keys.put("another-key", b"secret")
            await encoder.nc.flush()
            await asyncio.sleep(0.3)
            assert heard == []
            info = await admin.js.stream_info(subjects.STEP_STREAM)
            assert info.state.messages == 0 and info.config.subjects == [subjects.STEP_SUBJECTS]
        finally:
            await encoder.close()
            await admin.close()

    asyncio.run(main())


def test_a_gateway_may_create_streams_and_publish_steps(locked: LockedNats) -> None:
    async def main() -> None:
        gateway = await _connected(locked.settings("gateway"), "gateway")
        try:
            await gateway.ensure_streams()
            before = (await gateway.js.stream_info(subjects.STEP_STREAM)).state.messages
            ack = await gateway.js.publish(subjects.step_subject("denoise", "sd3-transformer"), b"{}")
            assert ack.stream == subjects.STEP_STREAM
            assert (await gateway.js.stream_info(subjects.STEP_STREAM)).state.messages == before + 1
        finally:
            await gateway.close()

    asyncio.run(main())


def test_the_gateway_serves_https_verified_with_the_ca(locked: LockedNats, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "LEGO_NATS_URL": locked.url,
        "LEGO_NATS_USER": "gateway",
        "LEGO_NATS_PASSWORD_FILE": str(locked.secrets / "gateway.password"),
        "LEGO_NATS_TLS_CA": str(locked.certs.ca),
        "LEGO_GATEWAY_TLS_CERT": str(locked.certs.cert),
        "LEGO_GATEWAY_TLS_KEY": str(locked.certs.key),
        "LEGO_AUTH": "off",
        "LEGO_STATE_DIR": str(tmp_path),
    }
    with open(tmp_path / "gateway.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.gateway", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        verify = ssl.create_default_context(cafile=str(locked.certs.ca))
        give_up, answer = time.monotonic() + 60, None
        while time.monotonic() < give_up and proc.poll() is None:
            try:
                answer = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=verify, timeout=2)
                break
            except httpx.ConnectError:
                time.sleep(0.2)
        assert answer is not None and answer.status_code == 200, (tmp_path / "gateway.log").read_text()[-2000:]
        with pytest.raises(httpx.ConnectError):  # without the CA the certificate is not trusted
            httpx.get(f"https://127.0.0.1:{port}/healthz", timeout=2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


async def test_the_gateway_keeps_the_lora_registry_and_a_denoiser_follows_it(locked: LockedNats) -> None:
    """LEGO_LORAS: the gateway makes and writes it; a denoiser watches it (to free deleted LoRAs)
    and hears prefetch hints, but may not write the registry."""
    from shared.lora_registry import LoraRecord, LoraRegistry

    gateway_bus = await _connected(locked.settings("gateway"), "test-gateway")
    denoiser_bus = await _connected(locked.settings("denoiser"), "test-denoiser")
    gateway, follower = LoraRegistry(gateway_bus), LoraRegistry(denoiser_bus)
    deleted: list[str] = []
    follower.on_delete.append(lambda record: deleted.append(record.name))
    heard: asyncio.Queue[list] = asyncio.Queue()
    try:
        await gateway_bus.ensure_streams()
        await gateway.start(seed_builtins=True)
        follower.follow_in_background()
        await gateway.register(LoraRecord(name="ink", base="sd3-transformer", source="path", path="/x", sha256="ab"))
        await denoiser_bus.subscribe_lora_prefetch("sd3-transformer", heard.put_nowait)
        await denoiser_bus.nc.flush()
        # A hint is best effort (core NATS: one sent while a connection is being remade is lost),
        # so it is sent until heard; a denoiser not allowed to hear it never would.
        for _ in range(20):
            await gateway_bus.publish_lora_prefetch("sd3-transformer", [gateway.get("ink").choice(1.0)])
            with contextlib.suppress(TimeoutError):
                hint = await asyncio.wait_for(heard.get(), 0.5)
                break
        else:
            raise AssertionError("the denoiser never heard a LoRA prefetch hint")
        assert [c.name for c in hint] == ["ink"]
        for _ in range(100):  # the follower has caught up with the bucket: it holds "ink"
            if follower.get("ink") is not None:
                break
            await asyncio.sleep(0.1)
        assert follower.get("ink") is not None
        await gateway.delete("ink")
        for _ in range(100):
            if deleted:
                break
            await asyncio.sleep(0.1)
        assert deleted == ["ink"] and follower.get("sd3-lora-a") is not None
        await _refused(follower.kv.put("ink", b"{}"))
    finally:
        await follower.close()
        await gateway.close()
        await gateway_bus.close()
        await denoiser_bus.close()


async def test_the_autoscaler_hears_the_gateways_admissions_and_a_model_service_may_not(locked: LockedNats) -> None:
    """lego.admitted: the gateway announces each admitted request's steps, the autoscaler hears
    them (its scale-up before the steps arrive); a denoiser's subscription is refused."""
    gateway = await _connected(locked.settings("gateway"), "test-gateway")
    autoscaler = await _connected(locked.settings("autoscaler"), "test-autoscaler")
    denoiser = await _connected(locked.settings("denoiser"), "test-denoiser")
    heard: asyncio.Queue[list] = asyncio.Queue()
    errors: list[Exception] = []

    async def record(exc: Exception) -> None:  # what the server says to the denoiser's connection
        errors.append(exc)

    denoiser._on_error = record  # type: ignore[method-assign]
    try:
        await autoscaler.subscribe_admitted(heard.put_nowait)
        await autoscaler.nc.flush()
        await denoiser.subscribe_admitted(heard.put_nowait)
        for _ in range(20):  # core NATS: sent until heard (one sent during a reconnect is lost)
            await gateway.publish_admitted([("denoise", "sd3-transformer")])
            with contextlib.suppress(TimeoutError):
                steps = await asyncio.wait_for(heard.get(), 0.5)
                break
        else:
            raise AssertionError("the autoscaler never heard an admission")
        assert steps == [("denoise", "sd3-transformer")]
        for _ in range(50):  # the server refuses the denoiser's subscription
            if any("permissions violation" in str(e).lower() for e in errors):
                break
            await asyncio.sleep(0.1)
        assert any("permissions violation" in str(e).lower() for e in errors), errors
    finally:
        for bus in (gateway, autoscaler, denoiser):
            await bus.close()
