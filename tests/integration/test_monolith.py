"""The monolithic baseline serves a whole workflow from one process: the same image as
diffusers' own pipeline (it is that pipeline), through the same bus and tensor plane."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from baseline.monolith.client import MonolithClient
from baseline.monolith.launcher import MonolithMesh
from baseline.monolith.steps import PIPELINE
from lego.launcher import Mesh, MeshConfig, free_port
from shared.bus import Bus
from shared.presence import live_replicas
from shared.tensor_plane import TensorPlane
from tests.oracle import assert_images_match, reference_images


@pytest.fixture(scope="module")
def monolith(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    mesh = MonolithMesh(
        MeshConfig(
            port=free_port(),
            workflows=["sd3"],
            env={"LEGO_MODEL_CACHE_DIR": str(model_cache), "HF_HUB_OFFLINE": "1"},
            log_dir=tmp_path_factory.mktemp("monolith-logs"),
            quiet=True,
        )
    )
    mesh.start(ready_timeout_s=300)
    yield mesh
    mesh.stop()
    assert not [c.name for c in mesh.children if c.alive()]


def test_monolith_serves_the_workflow_as_its_pipeline(monolith, reference_pipeline) -> None:
    params = {
        "prompt": "a lighthouse, monolithic",
        "negative_prompt": "",
        "height": 64,
        "width": 64,
        "num_inference_steps": 3,
        "guidance_scale": 5.0,
        "seed": 11,
        "n": 1,
    }

    async def scenario():
        bus = Bus(monolith.settings(), name="test-monolith")
        await bus.connect()
        plane = TensorPlane(bus.settings)
        await plane.start()
        try:
            client = MonolithClient(bus, plane)
            await client.start()
            images = await client.generate("sd3", params, timeout_s=120)
            for _ in range(40):  # the heartbeat after the step (every 2 s) carries its count and time
                replicas = [r for r in await live_replicas(bus) if r.kind == PIPELINE]
                if replicas and replicas[0].steps_done:
                    break
                await asyncio.sleep(0.25)
            return images, replicas
        finally:
            await bus.close()
            await plane.close()

    images, replicas = asyncio.run(scenario())
    assert [(r.model_id, r.steps_done) for r in replicas] == [("sd3", 1)]
    assert replicas[0].seconds_per_item > 0 and replicas[0].param_bytes > 0
    [want] = reference_images(
        reference_pipeline, prompt=params["prompt"], width=64, height=64, steps=3, guidance=5.0, seed=11
    )
    assert images.shape == (1, 64, 64, 3)
    assert_images_match(images[0], want)
