"""A request split over a parallel group gives the image the unsplit mesh gives, and the one
diffusers' own pipeline gives (the oracle's bounds), for every workflow of the catalogue,
through the REST API.

A mesh of real processes beside the shared unsplit one, every denoiser a group of 2 joined by
torch.distributed (gloo, CPU worker processes) in `always` mode so every request is split: CFG
halves for sd3, sd35-large, sd15 and sdxl, image tokens for flux. The denoisers' own /metrics
say each request really ran at degree 2. (Groups of 4: tests/integration/test_parallel_split.py.)
"""

from __future__ import annotations

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
from tests.oracle import assert_images_match, png_to_array

__all__ = ["references"]  # the oracle's pipelines, one per family, built once for this module

@pytest.fixture(scope="module")
def group2_mesh(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    yield from running_mesh(
        model_cache,
        tmp_path_factory.mktemp("group2-logs"),
        LEGO_DENOISE_GROUP_SIZE="2",
        LEGO_PARALLEL_MODE="always",
        LEGO_TORCH_THREADS="1",  # 2 cores for 2 devices a group: no thread oversubscription
    )


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


@pytest.mark.parametrize(("workflow", "extra"), CASES, ids=[w for w, _ in CASES])
def test_split_over_2_equals_unsplit_and_pipeline(group2_mesh, mesh, references, settings, workflow, extra):
    _check(group2_mesh, mesh, references, settings, workflow, extra, degree=2)
