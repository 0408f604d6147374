"""JetStream delivery guarantees on the real mesh: a killed replica loses nothing, and a step
delivered twice answers once."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

import httpx

from shared.bus import NATS_MSG_ID, Bus
from shared.messages import StepKind, StepRequest, StepResult
from shared.presence import live_replicas
from shared.settings import Settings
from shared.subjects import result_subject
from tests.generating import Generation
from tests.oracle import assert_images_match, png_to_array, reference_images
from tests.waiting import wait_for

PROMPT = "a castle on a hill, crash test"


def _bus_settings(mesh) -> Settings:
    return mesh.settings()


async def _denoiser_pids(mesh) -> dict[str, int]:
    bus = Bus(_bus_settings(mesh), name="test-presence")
    await bus.connect()
    try:
        return {
            r.replica_id: r.pid
            for r in await live_replicas(bus)
            if r.kind == StepKind.DENOISE and r.model_id == "sd3-transformer"
        }
    finally:
        await bus.close()


def test_killing_the_computing_denoiser_still_completes_the_request(mesh, reference_pipeline):
    pids = asyncio.run(_denoiser_pids(mesh))
    assert len(pids) == 2, f"expected two SD3 denoiser replicas, presence shows {pids}"
    request_id = f"crash-{uuid.uuid4().hex[:8]}"
    body = {"prompt": PROMPT, "size": "256x256", "num_inference_steps": 60, "seed": 99, "guidance_scale": 5.0}
    generation = Generation(mesh.url, body, request_id)
    # Wait until the denoising loop is visibly running, then kill the replica running it.
    victim = None
    give_up = time.monotonic() + 120
    while time.monotonic() < give_up and victim is None:
        status = httpx.get(f"{mesh.url}/v1/requests/{request_id}", timeout=10)
        if status.status_code == 200:
            s = status.json()
            if s["step"] >= 1 and s["replicas"].get("denoise") in pids:
                victim = pids[s["replicas"]["denoise"]]
        time.sleep(0.02)
    assert victim is not None, "the denoise step never started"
    os.kill(victim, signal.SIGKILL)
    # Its replacement starts now, so that the tests after this one find two replicas again (it
    # is still loading when AckWait redelivers the step; either way another replica finishes it).
    wait_for("the killed replica to be restarted", mesh.restart_dead, timeout_s=30)
    answer = generation.answer()
    assert answer.get("status") == 200, answer
    # Redelivered to another replica: the same image as diffusers gives.
    [want] = reference_images(reference_pipeline, prompt=PROMPT, width=256, height=256, steps=60, guidance=5.0, seed=99)
    assert_images_match(png_to_array(answer["json"]["data"][0]["b64_json"]), want)
    status = httpx.get(f"{mesh.url}/v1/requests/{request_id}", timeout=10).json()
    assert status["replicas"]["denoise"] != next(k for k, v in pids.items() if v == victim)

    def two_again() -> bool:
        now = asyncio.run(_denoiser_pids(mesh))
        return len(now) == 2 and victim not in now.values()

    wait_for("the replacement to announce itself", two_again, timeout_s=120, every_s=0.5)


def test_duplicate_delivery_of_a_step_answers_once(mesh):
    async def scenario() -> list[StepResult]:
        bus = Bus(_bus_settings(mesh), name="test-duplicates")
        await bus.connect()
        gateway_id = f"test-{uuid.uuid4().hex[:8]}"
        results: list[StepResult] = []
        probe_done = asyncio.Event()

        async def on_result(result: StepResult) -> None:
            results.append(result)
            if result.node_id == "probe":
                probe_done.set()

        await bus.subscribe_results(gateway_id, on_result)
        request_id = uuid.uuid4().hex

        def step(node_id: str, attempt: int) -> StepRequest:
            return StepRequest(
                request_id=request_id,
                node_id=node_id,
                kind=StepKind.ENCODE,
                model_id="clip-l",
                params={"prompt": "duplicate me", "negative_prompt": ""},
                reply_to=result_subject(gateway_id),
                deadline=time.time() + 120,
                attempt=attempt,
            )

        # The same step published under two message ids gets past JetStream's publish dedupe:
        # the replica really receives the same step twice, as after a lost ack.
        await bus.publish_step(step("clip_l", 1), headers={NATS_MSG_ID: "dup-a"})
        await bus.publish_step(step("clip_l", 1), headers={NATS_MSG_ID: "dup-b"})
        # The single clip-l replica works in order: once the probe is answered, so are both copies.
        await bus.publish_step(step("probe", 1))
        await asyncio.wait_for(probe_done.wait(), 120)
        await bus.publish_release(request_id)
        await bus.close()
        return results

    results = asyncio.run(scenario())
    answers = [r for r in results if r.node_id == "clip_l"]
    assert len(answers) == 1, f"{len(answers)} results for one node"
    assert answers[0].ok and set(answers[0].outputs) == {"embeds", "pooled"}
