"""A request split over a parallel group gives the image the unsplit mesh gives, and the one
diffusers' own pipeline gives (the oracle's bounds), through the REST API: every family (the
UNets' only test at their degree, 2), with ControlNets, LoRAs, several images.

A mesh of real processes beside the shared unsplit one, every denoiser a group of 2 joined by
torch.distributed (gloo, CPU worker processes) in `always` mode so every request is split: CFG
halves for sd3, sd35-large, sd15 and sdxl, image tokens for flux. The denoisers' own /metrics
say each request really ran at degree 2. (Every SD3/SD3.5/Flux workflow over 2 and 4 devices:
tests/integration/test_parallel_split.py.)
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lego.launcher import Mesh
from shared.messages import StepKind
from shared.workflows.catalogue import catalogue
from tests.conftest import running_mesh
from tests.e2e.test_catalogue_oracle import CASES, _b64png, _body, control_image, reference_images, references
from tests.e2e.test_observability import metrics_urls, scrape, value
from tests.generating import Generation
from tests.oracle import assert_images_match, png_to_array
from tests.waiting import wait_for

__all__ = ["references"]  # the oracle's pipelines, one per family, built once for this module


@pytest.fixture(scope="module")
def group2_mesh(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """The whole catalogue, each denoiser a group of 2; stopping it leaves no follower behind."""
    started = running_mesh(
        model_cache,
        tmp_path_factory.mktemp("group2-logs"),
        LEGO_DENOISE_GROUP_SIZE="2",
        LEGO_PARALLEL_MODE="always",
        LEGO_TORCH_THREADS="1",  # 2 cores for 2 devices a group: no thread oversubscription
    )
    mesh = next(started)
    yield mesh
    try:
        # on a CPU a leader only coordinates: 2 followers for each of 5 denoisers (a group the tests
        # killed is formed again first: on a loaded box that takes a minute)
        groups = wait_for("every denoiser's group of 2", lambda: _complete_groups(mesh, 5), 240)
        followers = [f for members in groups.values() for f in members]
    finally:
        next(started, None)  # stops the mesh (SIGTERM: the leaders stop their followers), whatever failed
    wait_for("every follower to be gone", lambda: not any(_alive(p) for p in followers), 30)


def _complete_groups(mesh: Mesh, count: int, model: str | None = None) -> dict[int, list[int]] | None:
    """{leader pid: its 2 follower pids} once `count` live leaders in presence each have 2 live
    followers, else None. Presence can still list a leader killed a moment ago (its key lives
    until it expires), and a group started again takes a while to form: both are waited out."""
    groups = {}
    for leader in asyncio.run(_leader_pids(mesh, model)):
        followers = [f for f in _followers_of(leader) if _alive(f)]
        if _alive(leader) and len(followers) == 2:
            groups[leader] = followers
    return groups if len(groups) == count else None


def _request(workflow: str, extra: dict) -> tuple[dict, object]:
    body = _body(workflow, **extra)
    control = None
    if "controlnet" in body:
        width, height = (int(v) for v in body["size"].split("x"))
        control = control_image(width, height)
        body["controlnet"] = {**body["controlnet"], "image": _b64png(control)}
    return body, control


def _images(mesh: Mesh, body: dict) -> list:
    r = httpx.post(f"{mesh.url}/v1/images/generations", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return [png_to_array(item["b64_json"]) for item in r.json()["data"]]


def _split_count(mesh: Mesh, model: str, degree: int) -> float:
    return value(scrape(metrics_urls(mesh)[model]), "lego_denoise_requests_by_degree_total", degree=str(degree))


def _check(group_mesh: Mesh, unsplit: Mesh, references, settings, workflow: str, extra: dict, degree: int) -> None:
    body, control = _request(workflow, extra)
    model = catalogue()[workflow].node_of_kind(StepKind.DENOISE).model
    before = _split_count(group_mesh, model, degree)
    got = _images(group_mesh, body)
    assert _split_count(group_mesh, model, degree) == before + 1, f"{workflow} did not run at degree {degree}"
    want = reference_images(references, settings, workflow, body, control)
    alone = _images(unsplit, body)
    assert len(got) == len(want) == len(alone) == body.get("n", 1)
    for split_image, pipeline_image, unsplit_image in zip(got, want, alone, strict=True):
        assert_images_match(split_image, pipeline_image)
        assert_images_match(split_image, unsplit_image)


# Every family through the API, with a ControlNet, LoRAs, n > 1 and a negative prompt among them.
# (Every transformer workflow over 2 and 4 devices: tests/integration/test_parallel_split.py.)
API_CASES = [c for c in CASES if c[0] in ("sd3-controlnet-lora", "sd35-large", "flux-controlnet-lora", "sd15", "sdxl")]


@pytest.mark.parametrize(("workflow", "extra"), API_CASES, ids=[w for w, _ in API_CASES])
def test_split_over_2_equals_unsplit_and_pipeline(group2_mesh, mesh, references, settings, workflow, extra):
    _check(group2_mesh, mesh, references, settings, workflow, extra, degree=2)


# -- a group's request behaves as a single device's: progress, cancel, a member dying ------------


def _events(url: str) -> list[dict]:
    out = []
    with httpx.stream("GET", url, timeout=300) as r:
        assert r.status_code == 200, r.read()
        out += [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    return out


def test_a_split_request_streams_progress_and_cancels_like_any(group2_mesh):
    models = httpx.get(f"{group2_mesh.url}/v1/models", timeout=10).json()["models"]
    [sd3] = [m for m in models if m["model_id"] == "sd3-transformer"]
    assert [r["group_devices"] for r in sd3["replicas"]] == [2]  # one replica, a group of 2 devices
    body = {"prompt": "a kite", "size": "128x128", "num_inference_steps": 60, "seed": 4, "wait": False}
    r = httpx.post(f"{group2_mesh.url}/v1/images/generations", json=body, timeout=30)
    assert r.status_code == 202, r.text
    status_url = group2_mesh.url + r.json()["status_url"]
    wait_for("the split loop to run", lambda: httpx.get(status_url, timeout=10).json()["step"] >= 3, 120)
    r = httpx.delete(status_url, timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    events = _events(status_url + "/events")
    steps = [e["step"] for e in events if e["type"] == "progress"]
    assert steps == list(range(1, len(steps) + 1)) and 3 <= len(steps) < 60, steps
    assert events[-1]["type"] == "error" and events[-1]["code"] == "cancelled"
    # The group serves on, split.
    before = _split_count(group2_mesh, "sd3-transformer", 2)
    r = httpx.post(f"{group2_mesh.url}/v1/images/generations", json={"prompt": "ok", "size": "64x64"}, timeout=300)
    assert r.status_code == 200, r.text
    assert _split_count(group2_mesh, "sd3-transformer", 2) == before + 1


async def _leader_pids(mesh: Mesh, model: str | None = None) -> list[int]:
    """The pids of the denoiser replicas (group leaders) in presence, of `model` or all."""
    from shared.bus import Bus
    from shared.presence import live_replicas

    bus = Bus(mesh.settings(), name="test-group-pids")
    await bus.connect()
    try:
        return sorted(
            {r.pid for r in await live_replicas(bus) if r.kind == StepKind.DENOISE and model in (None, r.model_id)}
        )
    finally:
        await bus.close()


def _followers_of(leader: int) -> list[int]:
    """Pids of the group followers started by `leader` (their command line names it)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if b"services.denoiser.group.follower" in args and str(leader).encode() in args:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("victim", ["follower", "leader"])
def test_a_group_member_killed_mid_request_loses_nothing(group2_mesh, mesh, victim):
    """kill -9 a process of the SD3 group (a follower, or the leader) while it denoises a split
    request: the group goes as a whole (a leader leaves when a follower dies; a follower when its
    leader dies), the
    mesh starts it again, the step is redelivered, and the request ends with the unsplit image."""
    # the group's 2 devices; the leader coordinates (a group the other case killed: formed again first)
    [(leader, followers)] = wait_for(
        "the SD3 group of 2", lambda: _complete_groups(group2_mesh, 1, "sd3-transformer"), 240
    ).items()
    follower = followers[0]
    request_id = f"group-crash-{uuid.uuid4().hex[:8]}"
    body = {"prompt": "a lantern", "size": "128x128", "num_inference_steps": 30, "seed": 12, "guidance_scale": 5.0}
    generation = Generation(group2_mesh.url, body, request_id)
    status_url = f"{group2_mesh.url}/v1/requests/{request_id}"
    wait_for("the split loop to run", lambda: httpx.get(status_url, timeout=10).json().get("step", 0) >= 2, 120)
    os.kill(follower if victim == "follower" else leader, signal.SIGKILL)
    wait_for("the whole group to be gone", lambda: not any(_alive(p) for p in [leader, *followers]), 30)
    wait_for("the mesh to start the denoiser again", group2_mesh.restart_dead, 30)
    answer = generation.answer()
    assert answer.get("status") == 200, answer
    [alone] = _images(mesh, body)
    assert_images_match(png_to_array(answer["json"]["data"][0]["b64_json"]), alone)
