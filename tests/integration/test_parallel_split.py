"""Groups of 4 real processes (torch.distributed, gloo): every SD3, SD3.5-Large and Flux workflow
split over 2 and over 4 devices gives the unsplit chain's image and diffusers' pipeline's (the
oracle's bounds). Over 2: CFG halves, or 2 token shards without CFG (Flux, guidance 1), or the
rows of 2 images. Over 4: CFG halves x 2 token shards, 4 token shards, or 4 row parts (two
images with CFG). ControlNet residuals are cut to each device's rows and tokens, LoRAs switched
on every device.

The chain is the one of test_workflows_match_pipeline.py (encoders, the VAE, the ControlNet and
the pipelines in this process); only the denoiser runs on a group: the leader here (on a CPU it
only coordinates), four followers as processes, one per device; and once a leader that runs
device 0 itself, as on GPUs. (Groups of 2, through the whole mesh: tests/e2e/test_parallel_groups.py.)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from services.denoiser.denoise import denoise_loop
from services.denoiser.group.engine import GroupEngine, resumed
from services.denoiser.group.executor import GroupExecutor
from services.vae.model import decode
from shared.zoo import load_denoiser
from shared.zoo.families import FAMILIES
from tests.oracle import assert_images_match
from tests.unit.test_workflows_match_pipeline import (
    CN,
    WORKFLOWS,
    P,
    lab,
    mesh_images,
    pipeline_images,
    request_inputs,
)

__all__ = ["lab"]


class Groups:
    """One group of 4 per family, started when first asked for; the previous one stopped then
    (the cases run family by family), so at most 4 processes of a group run at once."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.current: tuple[str, GroupEngine] | None = None
        self.degrees: list[int] = []

    def engine(self, family: str) -> GroupEngine:
        if self.current is None or self.current[0] != family:
            self.close()
            model = FAMILIES[family].denoiser
            executor = GroupExecutor(model, lambda: load_denoiser(model, self.settings), self.settings, 4)
            engine = GroupEngine(executor, max_batch=1, mode="always", on_degree=self.degrees.append)
            self.current = (family, engine)
        return self.current[1]

    def close(self) -> None:
        if self.current is not None:
            self.current[1].close()
            self.current = None


@pytest.fixture(scope="module")
def groups(settings) -> Iterator[Groups]:
    g = Groups(settings)
    yield g
    g.close()


def split_images(lab, groups: Groups, family: str, *, degree: int = 4, loras=None, **kw) -> np.ndarray:
    """The same request as `mesh_images`, its denoising loop run on the family's group of 4
    ("always" mode: split over exactly `degree` devices)."""
    engine = groups.engine(family)
    engine.max_degree = degree
    inputs = request_inputs(lab, family, **kw)
    latents = engine.submit(denoise_loop(engine.executor.state.bundle, inputs), loras).result(timeout=300)
    return decode(lab.family(family).vae, latents).numpy()


@pytest.mark.parametrize("degree", [2, 4])
@pytest.mark.parametrize(
    ("family", "controlnet", "loras", "params"), [w[1:] for w in WORKFLOWS], ids=[w[0] for w in WORKFLOWS]
)
def test_split_equals_unsplit_and_pipeline(lab, groups, family, controlnet, loras, params, degree) -> None:
    kw = {"prompt": P, "height": 64, "width": 64, "steps": 3, "guidance": 4.0, "seed": 21} | params
    control = CN if controlnet else None
    got = split_images(lab, groups, family, degree=degree, control=control, loras=loras, **kw)
    assert groups.degrees[-1] == degree, f"the request was not split over {degree} devices"
    assert_images_match(got, mesh_images(lab, family, control=control, loras=loras, **kw))
    assert_images_match(got, pipeline_images(lab, family, control=control, loras=loras, **kw))
    assert got.std() > 5


def test_loras_of_a_split_request_are_active_on_every_device(lab, groups) -> None:
    """A LoRA on only some devices would change only some rows or tokens: with one, the split
    image differs from the base model's exactly as the unsplit one does."""
    kw = {"prompt": P, "height": 64, "width": 64, "steps": 3, "guidance": 1.0, "seed": 5}
    with_lora = split_images(lab, groups, "flux", loras=[("flux-lora-a", 1.0)], **kw)
    base = split_images(lab, groups, "flux", **kw)
    assert not np.array_equal(with_lora, base)
    assert_images_match(with_lora, mesh_images(lab, "flux", loras=[("flux-lora-a", 1.0)], **kw))


def _arriving_after_first_step(loop, arrive):
    """`loop`, calling `arrive()` once its first call has run (so its next ones run after)."""
    out = yield next(loop)
    arrive()
    return (yield from resumed(loop.send(out), loop))


def test_a_request_that_shrinks_mid_loop_gives_the_unsplit_image(lab, groups, caplog) -> None:
    """Adaptive mode: a lone Flux request takes all 4 devices; a second arrives after its first
    step, so its later steps run on 2 (and back on 4 if the second leaves first). Both images are
    the unsplit chain's."""
    caplog.set_level(logging.INFO, logger="lego.denoiser.group")
    kw = {"prompt": P, "height": 64, "width": 64, "steps": 4, "guidance": 1.0}
    engine = groups.engine("flux")
    engine.mode, engine.max_degree, engine.step_s = "adaptive", 4, {}  # nothing measured: a lone request splits
    bundle = engine.executor.state.bundle
    later: list = []
    second_inputs = request_inputs(lab, "flux", seed=8, **kw)

    def arrive() -> None:
        later.append(engine.submit(denoise_loop(bundle, second_inputs)))

    try:
        loop = _arriving_after_first_step(denoise_loop(bundle, request_inputs(lab, "flux", seed=7, **kw)), arrive)
        first = engine.submit(loop).result(timeout=300)
        second = later[0].result(timeout=300)
    finally:
        engine.mode = "always"
    assert groups.degrees[-2:] == [4, 2]
    assert "unit 0-3: degree 4 -> 2 on devices 0-1" in caplog.text
    for seed, latents in ((7, first), (8, second)):
        got = decode(lab.family("flux").vae, latents).numpy()
        assert_images_match(got, mesh_images(lab, "flux", seed=seed, **kw))


def test_a_request_on_one_device_runs_whole_on_its_follower_with_loras_progress_and_cancel(lab, groups) -> None:
    """A request of degree 1 with its inputs at hand is run whole by the follower of its device
    (group/hosted.py): the same image as the unsplit chain with its LoRA on, every step's
    progress heard here (relayed by the lane's reader, not run by this process), and a cancel
    that stops it after the step in hand; the group serves on."""
    from dataclasses import replace

    from services.denoiser.group.engine import RequestFacts
    from services.denoiser.loop import DenoiseCancelled

    kw = {"prompt": P, "height": 64, "width": 64, "steps": 4, "guidance": 1.0, "seed": 9}
    lora = [("flux-lora-a", 1.0)]
    engine = groups.engine("flux")
    engine.mode = "never"
    bundle = engine.executor.state.bundle
    heard: list[tuple[int, int, str]] = []
    try:
        inputs = replace(
            request_inputs(lab, "flux", **kw),
            on_step=lambda done, total: heard.append((done, total, threading.current_thread().name)),
        )
        facts = RequestFacts(label="whole", steps=4, inputs=inputs)
        latents = engine.submit(denoise_loop(bundle, inputs), lora, facts).result(timeout=300)
        assert [(d, t) for d, t, _ in heard] == [(1, 4), (2, 4), (3, 4), (4, 4)]
        assert all(name.startswith("group-lane-") for _, _, name in heard), heard  # the follower ran the steps

        stop = threading.Event()
        progressed: list[int] = []
        cancelled = replace(
            request_inputs(lab, "flux", **(kw | {"steps": 40})),
            on_step=lambda done, _total: (progressed.append(done), stop.set()),
            should_stop=stop.is_set,
        )
        doomed = engine.submit(denoise_loop(bundle, cancelled), None, RequestFacts(steps=40, inputs=cancelled))
        with pytest.raises(DenoiseCancelled):
            doomed.result(timeout=300)
        assert 1 <= len(progressed) < 40
        again = engine.submit(denoise_loop(bundle, inputs), lora, facts).result(timeout=300)
    finally:
        engine.mode = "always"
    assert groups.degrees[-3:] == [1, 1, 1]
    got = decode(lab.family("flux").vae, latents).numpy()
    assert_images_match(got, mesh_images(lab, "flux", loras=lora, **kw))
    assert_images_match(decode(lab.family("flux").vae, again).numpy(), got)


def test_a_leader_that_runs_device_0_itself_as_on_gpus_gives_the_same_image(lab, groups, settings) -> None:
    """On GPUs the leader runs device 0 on a thread of its own process and starts one follower
    fewer; a Flux request split into 2 token shards (their keys and values gathered between the
    leader's device and the follower's in every attention layer) gives the unsplit image."""
    import psutil

    groups.close()  # one group at a time
    model = FAMILIES["flux"].denoiser
    executor = GroupExecutor(model, lambda: load_denoiser(model, settings), settings, 2, leader_computes=True)
    engine = GroupEngine(executor, max_batch=1, mode="always")
    kw = {"prompt": P, "height": 64, "width": 64, "steps": 3, "guidance": 1.0, "seed": 3}
    try:
        followers = [
            p for p in psutil.Process().children() if "services.denoiser.group.follower" in " ".join(p.cmdline())
        ]
        assert len(followers) == 1, followers
        inputs = request_inputs(lab, "flux", **kw)
        latents = engine.submit(denoise_loop(executor.state.bundle, inputs)).result(timeout=300)
    finally:
        engine.close()
    assert_images_match(decode(lab.family("flux").vae, latents).numpy(), mesh_images(lab, "flux", **kw))
