"""The meshes only end-to-end tests use, each started once for the tests that share it and
stopped when the e2e tests are done (package scope: they do not idle through the integration
and unit tests). The whole catalogue's `mesh` is in tests/conftest.py: integration tests use it
too."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lego.launcher import Mesh
from shared.tensor_plane.ucx import ucx_installed
from tests.conftest import running_mesh
from tests.otlp import OtlpReceiver


@pytest.fixture(scope="package")
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """Where sd3_tcp_mesh's services export their spans."""
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="package")
def sd3_tcp_mesh(
    model_cache: Path, otlp_receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    """An sd3 mesh (and the ControlNet service), one replica of each model, every tensor over the
    tcp transport (none inline above 1 KiB), tracing on (OTEL_* variables, spans sent every
    200 ms to `otlp_receiver`): the transport test's tcp case, the overload test (which needs one
    denoiser and does not care how tensors travel) and the observability tests share it."""
    yield from running_mesh(
        model_cache,
        tmp_path_factory.mktemp("sd3-tcp-logs"),
        workflows=["sd3", "sd3-controlnet"],
        LEGO_TRANSPORT="tcp",
        LEGO_INLINE_MAX_BYTES="1024",
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp_receiver.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="200",
    )


@pytest.fixture(scope="package")
def batching_mesh(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """An sd3 mesh (and the ControlNet service) that batches: LEGO_*_MAX_BATCH=4 for the
    denoiser, the ControlNet, the encoders and the VAE. Where the ucx extra is installed every
    tensor is forced over UCX (none inline above 1 KiB): the transport test's ucx case shares it
    (a lone request runs the unbatched path, bit for bit)."""
    ucx = {"LEGO_TRANSPORT": "ucx", "LEGO_INLINE_MAX_BYTES": "1024"} if ucx_installed() else {}
    yield from running_mesh(
        model_cache,
        tmp_path_factory.mktemp("batching-logs"),
        workflows=["sd3", "sd3-controlnet"],
        LEGO_DENOISE_MAX_BATCH="4",
        LEGO_CONTROLNET_MAX_BATCH="4",
        LEGO_ENCODE_MAX_BATCH="4",
        LEGO_VAE_MAX_BATCH="4",
        **ucx,
    )
