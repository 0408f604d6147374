"""The meshes the end-to-end tests share, each started once for the tests that use it and
stopped when the e2e tests are done (package scope). Why not session scope: an idle mesh is a
dozen processes waking up every second or so, and on a 2-core box that slowed the CPU-bound
integration and unit tests after them by a fifth or more."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lego.launcher import Child, Mesh, free_port
from shared.tensor_plane.ucx import ucx_installed
from tests.conftest import running_mesh
from tests.otlp import OtlpReceiver


@pytest.fixture(scope="package")
def mesh(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """The whole catalogue's mesh (each model once), with two SD3 denoiser replicas so one can be killed."""
    yield from running_mesh(model_cache, tmp_path_factory.mktemp("mesh-logs"), {"sd3-transformer": 2})


@dataclass
class LockedGateway:
    """A gateway with API keys on, beside the shared mesh's own (which runs without keys): the
    key and fuzz tests use it, with no mesh of their own to start."""

    mesh: Mesh
    url: str
    child: Child

    @property
    def admin_key(self) -> str:
        assert self.mesh.admin_key_file is not None
        return self.mesh.admin_key_file.read_text().strip()


@pytest.fixture(scope="package")
def locked_gateway(mesh: Mesh) -> LockedGateway:
    import httpx

    from tests.waiting import wait_for

    port = free_port()
    child = mesh.add_gateway("gateway-locked", port, auth=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert child.alive(), "the locked gateway exited; see gateway-locked.log"
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for("the locked gateway to be ready", ready, timeout_s=120)
    return LockedGateway(mesh, url, child)


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
