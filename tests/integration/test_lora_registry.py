"""The LoRA registry through the gateway's REST API, on a real nats-server (no model services):
registering by path and by upload, what is refused and why (a LoRA of another base: 400 naming
the base it fits; not safetensors, a pickle: 400; a taken name: 409), and that every view of
the API follows the registry: GET /v1/loras, GET /v1/workflows, the OpenAPI document, and a
second gateway on the same bus."""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.gateway.app import create_app
from shared.settings import Settings
from shared.zoo import lora_path
from tests.waiting import wait_for, wait_for_async


@pytest.fixture
def gateways(nats_server: str, settings: Settings, tmp_path: Path) -> Iterator[tuple[TestClient, TestClient]]:
    def gateway(name: str) -> Settings:
        return Settings.from_env(
            nats_url=nats_server,
            auth="off",
            model_cache_dir=settings.model_cache_dir,
            gateway_id=name,
            lora_dir=str(tmp_path / "uploads"),
            lora_delete_grace_s=0.0,
        )

    with TestClient(create_app(gateway("gw-a"))) as a, TestClient(create_app(gateway("gw-b"))) as b:
        yield a, b


def copy_of(name: str, settings: Settings, into: Path, gain: float = 0.5) -> Path:
    """A new LoRA file: a built-in's tensors scaled by `gain` (same layers, so the same base)."""
    import safetensors.torch

    src = lora_path(name, settings)
    state = safetensors.torch.load_file(str(src / "pytorch_lora_weights.safetensors"))
    into.mkdir(parents=True, exist_ok=True)
    out = into / f"{name}-x{gain}.safetensors"
    safetensors.torch.save_file({k: v * gain for k, v in state.items()}, str(out))
    return out


def lora_names(client: TestClient, workflow: str) -> list[str]:
    listed = client.get("/v1/workflows").json()["workflows"]
    return next(w["loras"] for w in listed if w["name"] == workflow)


def test_register_list_use_and_delete(gateways, settings: Settings, tmp_path: Path) -> None:
    a, b = gateways
    file = copy_of("sd3-lora-a", settings, tmp_path / "mine")
    made = a.post("/v1/loras", json={"name": "ink", "base": "sd3", "path": str(file), "description": "ink style"})
    assert made.status_code == 201, made.text
    assert made.json()["base"] == "sd3-transformer" and len(made.json()["sha256"]) == 64
    # every view follows: this gateway at once, the other once the bucket's change reaches it
    assert "ink" in [r["name"] for r in a.get("/v1/loras").json()["loras"]]
    assert "ink" in lora_names(a, "sd3-lora") and "ink" not in lora_names(a, "flux-lora")
    doc = a.get("/openapi.json").json()
    assert '"ink"' in str(doc).replace("'", '"')
    wait_for("the second gateway to see the LoRA", lambda: "ink" in lora_names(b, "sd3-lora"), timeout_s=10)
    # a taken name, built-in names included
    again = b.post("/v1/loras", json={"name": "ink", "base": "sd3", "path": str(file)})
    assert again.status_code == 409 and "ink" in again.json()["error"]["message"]
    assert a.post("/v1/loras", json={"name": "sd3-lora-a", "base": "sd3", "path": str(file)}).status_code == 409
    # deleted: gone from every view, and a request naming it is refused with the reason
    assert b.delete("/v1/loras/ink").status_code == 200
    wait_for("the first gateway to drop the LoRA", lambda: "ink" not in lora_names(a, "sd3-lora"), timeout_s=10)
    body = {"prompt": "x", "workflow": "sd3-lora", "size": "64x64", "loras": [{"name": "ink"}]}
    refused = a.post("/v1/images/generations", json=body)
    assert refused.status_code == 422 and "unknown LoRA 'ink'" in refused.json()["error"]["message"]
    assert a.delete("/v1/loras/ink").status_code == 404
    assert a.delete("/v1/loras/sd3-lora-a").status_code == 409  # a built-in stays


def test_upload_is_stored_for_the_model_services(gateways, settings: Settings, tmp_path: Path) -> None:
    a, _ = gateways
    file = copy_of("flux-lora-b", settings, tmp_path / "mine", gain=2.0)
    made = a.post(
        "/v1/loras",
        data={"name": "glow", "base": "flux-transformer"},
        files={"file": ("glow.safetensors", file.read_bytes(), "application/octet-stream")},
    )
    assert made.status_code == 201, made.text
    stored = Path(made.json()["path"])
    assert stored.parent == tmp_path / "uploads" and stored.read_bytes() == file.read_bytes()
    assert made.json()["source"] == "upload" and "glow" in lora_names(a, "flux-lora")
    assert a.delete("/v1/loras/glow").status_code == 200
    wait_for("the deleted upload's file to go", lambda: not stored.exists(), timeout_s=10)


def test_a_lora_of_another_base_is_refused_naming_the_base_it_fits(gateways, settings: Settings) -> None:
    a, _ = gateways
    flux_file = lora_path("flux-lora-a", settings)  # it adapts Flux's single-stream blocks too: SD3 has none
    wrong = a.post("/v1/loras", json={"name": "wrong", "base": "sd3", "path": str(flux_file)})
    assert wrong.status_code == 400
    message = wrong.json()["error"]["message"]
    assert "does not fit sd3-transformer" in message and "it fits flux-transformer" in message
    assert "single_transformer_blocks.0.attn" in message  # which layer is missing
    assert "wrong" not in [r["name"] for r in a.get("/v1/loras").json()["loras"]]
    unknown_base = a.post("/v1/loras", json={"name": "wrong", "base": "sd15", "path": str(flux_file)})
    assert unknown_base.status_code == 400 and "takes no LoRAs" in unknown_base.json()["error"]["message"]


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (pickle.dumps({"transformer.x.lora_A.weight": [1.0]}), "not a safetensors file"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......", "not a safetensors file"),
        (None, "not a LoRA in the diffusers format"),  # safetensors, but no lora_A/lora_B pairs
    ],
    ids=["pickle", "bad-header", "no-lora-layers"],
)
def test_only_safetensors_loras_are_taken(gateways, tmp_path: Path, content: bytes | None, why: str) -> None:
    a, _ = gateways
    if content is None:
        import safetensors.torch
        import torch

        safetensors.torch.save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "plain.safetensors"))
        content = (tmp_path / "plain.safetensors").read_bytes()
    made = a.post("/v1/loras", data={"name": "bad", "base": "sd3"}, files={"file": ("bad.bin", content)})
    assert made.status_code == 400 and why in made.json()["error"]["message"], made.text
    assert not list((tmp_path / "uploads").glob("*"))  # nothing refused is kept


async def test_a_planned_requests_loras_are_read_by_its_denoisers_at_once(
    nats_server: str, settings: Settings, tmp_path: Path
) -> None:
    """The gateway's prefetch hint, over the bus, makes a denoiser read a registered LoRA's file
    into its host cache before any step names it (built-ins, local and tiny, are left alone)."""

    from services.denoiser.lora_host import HostLoraCache
    from services.denoiser.runner import DenoiserRunner
    from shared.bus import Bus
    from shared.lora_registry import LoraRecord, adapter_key
    from shared.messages import LoraChoice

    file = copy_of("sd3-lora-b", settings, tmp_path)
    runner = DenoiserRunner(model_id="sd3-transformer", bundle=None, settings=settings, host=HostLoraCache(1 << 30))
    listener, gateway = (
        Bus(Settings.from_env(nats_url=nats_server), "den"),
        Bus(Settings.from_env(nats_url=nats_server), "gw"),
    )
    await listener.connect()
    await gateway.connect()
    try:
        heard: list[list[LoraChoice]] = []
        reads: list[Future[object]] = []  # the reads the hints start
        start_read = runner.host.prefetch
        runner.host.prefetch = lambda key, path: reads.append(start_read(key, path)) or reads[-1]  # type: ignore[method-assign]

        def hear(loras: list[LoraChoice]) -> None:
            heard.append(loras)
            runner.prefetch(loras)

        await listener.subscribe_lora_prefetch("sd3-transformer", hear)
        await listener.subscribe_lora_prefetch("flux-transformer", heard.append)
        await listener.nc.flush()
        record = LoraRecord(name="ink", base="sd3-transformer", source="path", path=str(file), sha256="ab" * 32)
        key = adapter_key(record.choice(0.8))
        # A hint is best effort (core NATS: one sent while a connection is being remade is lost),
        # so it is sent until heard; the other base's hint first, so it is heard before ours.
        for _ in range(20):
            await gateway.publish_lora_prefetch("flux-transformer", [record.choice(1.0)])  # another base's denoisers
            await gateway.publish_lora_prefetch("sd3-transformer", [record.choice(0.8), LoraChoice(name="sd3-lora-a")])
            with contextlib.suppress(AssertionError):
                await wait_for_async("a prefetch hint", lambda: len(heard) >= 2, timeout_s=1.0)
                break
        assert heard, "the denoiser never heard a LoRA prefetch hint"
        await wait_for_async(f"the prefetch hint's read (heard: {heard})", lambda: reads and reads[0].done())
        assert reads[0].exception() is None, f"the read failed: {reads[0].exception()!r}"
        assert runner.host.keys() == [key] and runner.host.total_bytes() > 0
        assert runner.host.misses == 0  # read ahead of any step: the step will find it
    finally:
        runner.host.close()
        await listener.close()
        await gateway.close()


async def test_a_denoiser_frees_a_deleted_lora(nats_server: str, settings: Settings, tmp_path: Path) -> None:
    """A denoiser follows the registry: when a LoRA is deleted, the file it read for it leaves
    its host cache (the network's adapter goes at its next switch)."""

    from services.denoiser.lora_host import HostLoraCache
    from services.denoiser.runner import DenoiserRunner
    from shared.bus import Bus
    from shared.lora_registry import LoraRecord, LoraRegistry, adapter_key

    file = copy_of("sd3-lora-a", settings, tmp_path)
    runner = DenoiserRunner(model_id="sd3-transformer", bundle=None, settings=settings, host=HostLoraCache(1 << 30))
    gw_bus, den_bus = (Bus(Settings.from_env(nats_url=nats_server), n) for n in ("gw", "den"))
    await gw_bus.connect()
    await den_bus.connect()
    gateway, follower = LoraRegistry(gw_bus), LoraRegistry(den_bus)
    follower.on_delete.append(runner.forget_lora)
    follower.follow_in_background()  # before the bucket exists: it waits for the gateway to make it
    try:
        await gateway.start(seed_builtins=True)
        record = LoraRecord(name="ink", base="sd3-transformer", source="path", path=str(file), sha256="cd" * 32)
        await gateway.register(record)
        runner.prefetch([record.choice(1.0)])  # read on a reader thread
        key = adapter_key(record.choice(1.0))
        await wait_for_async(
            "the read and the registration", lambda: runner.host.keys() == [key] and follower.get("ink") is not None
        )
        await gateway.delete("ink")
        await wait_for_async("the deleted LoRA to leave the cache", lambda: not runner.host.keys())
        assert runner.host.keys() == [] and key in runner._forgotten
    finally:
        runner.host.close()
        await follower.close()
        await gateway.close()
        await gw_bus.close()
        await den_bus.close()
