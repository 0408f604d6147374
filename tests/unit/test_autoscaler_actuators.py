"""The Kubernetes and compose actuators against canned API answers.

No cluster and no Docker daemon can be reached here, so these tests answer the actuators'
HTTP requests with responses written to the documented shapes of the Kubernetes API
(apps/v1 DeploymentList, autoscaling/v1 Scale) and of the Docker Engine API (container list,
inspect, create) — not captured from a live server. They check both halves: what the
actuator reads out of those answers, and the requests it sends (paths, verbs, bodies).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
import urllib3

from services.autoscaler.actuators.compose import ComposeActuator
from services.autoscaler.actuators.kubernetes import SCALABLE_LABEL, KubernetesActuator

# --------------------------------------------------------------------------------------------
# Kubernetes: the official client, its HTTP layer (urllib3) answered from canned responses


def _deployment(name: str, models: str | None, replicas: int) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "legodiffusion"}
    annotations = {"legodiffusion.io/models": models} if models else {}
    return {
        "metadata": {
            "name": name,
            "namespace": "lego",
            "labels": {**labels, "legodiffusion.io/scalable": "true"},
            "annotations": annotations,
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": name.split("-")[0], "image": "legodiffusion:0.1.0"}]},
            },
        },
        "status": {"replicas": replicas, "readyReplicas": replicas},
    }


DEPLOYMENTS = {
    "kind": "DeploymentList",
    "apiVersion": "apps/v1",
    "metadata": {"resourceVersion": "48213"},
    "items": [
        _deployment("encoder", "clip-l,clip-g,t5", 1),
        _deployment("denoiser-sd3-transformer", "sd3-transformer", 2),
        _deployment("stray", None, 1),  # labelled but without its models annotation: left alone
    ],
}


def _scale(name: str, replicas: int) -> dict[str, Any]:
    return {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {"name": name, "namespace": "lego", "resourceVersion": "48214"},
        "spec": {"replicas": replicas},
        "status": {"replicas": replicas, "selector": f"app.kubernetes.io/name={name}"},
    }


class FakePoolManager:
    """Stands in for urllib3.PoolManager inside the kubernetes client's REST layer."""

    def __init__(self, answers: dict[tuple[str, str], dict[str, Any]]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, str, dict[str, list[str]], Any]] = []
        self.headers: list[dict[str, str]] = []

    def request(
        self, method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, **_: Any
    ) -> urllib3.HTTPResponse:
        parsed = urlparse(url)
        sent = json.loads(body) if isinstance(body, str | bytes) else body
        self.calls.append((method, parsed.path, parse_qs(parsed.query), sent))
        self.headers.append(dict(headers or {}))
        answer = self.answers[(method, parsed.path)]
        return urllib3.HTTPResponse(
            body=json.dumps(answer).encode(),
            status=200,
            headers={"Content-Type": "application/json"},
            preload_content=True,
        )

    def clear(self) -> None:
        pass


@pytest.fixture
def k8s() -> tuple[KubernetesActuator, FakePoolManager]:
    pytest.importorskip("kubernetes")
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = "https://k8s.invalid:6443"
    api_client = client.ApiClient(configuration)
    base = "/apis/apps/v1/namespaces/lego/deployments"
    fake = FakePoolManager(
        {
            ("GET", base): DEPLOYMENTS,
            ("GET", f"{base}/denoiser-sd3-transformer/scale"): _scale("denoiser-sd3-transformer", 2),
            ("PATCH", f"{base}/denoiser-sd3-transformer/scale"): _scale("denoiser-sd3-transformer", 3),
        }
    )
    api_client.rest_client.pool_manager = fake
    return KubernetesActuator(namespace="lego", api=client.AppsV1Api(api_client)), fake


def test_kubernetes_finds_the_scalable_deployments_and_their_models(k8s) -> None:
    actuator, fake = k8s
    assert actuator.units() == {"encoder": ("clip-l", "clip-g", "t5"), "denoiser-sd3-transformer": ("sd3-transformer",)}
    method, path, query, _ = fake.calls[0]
    assert (method, path) == ("GET", "/apis/apps/v1/namespaces/lego/deployments")
    assert query["labelSelector"] == [SCALABLE_LABEL]
    actuator.units()  # cached: listed again only after refresh_s
    assert len(fake.calls) == 1


def test_kubernetes_reads_and_patches_the_scale_subresource(k8s) -> None:
    actuator, fake = k8s
    assert actuator.current("denoiser-sd3-transformer") == 2
    actuator.scale("denoiser-sd3-transformer", 3)
    method, path, _, body = fake.calls[-1]
    assert (method, path) == ("PATCH", "/apis/apps/v1/namespaces/lego/deployments/denoiser-sd3-transformer/scale")
    assert body == {"spec": {"replicas": 3}}
    # A merge patch (a JSON patch would need a list of operations).
    assert "merge-patch+json" in fake.headers[-1]["Content-Type"]


def test_kubernetes_rbac_allows_what_the_actuator_calls() -> None:
    """The Role in deploy/k8s/autoscaler grants the verbs this actuator uses, on those resources."""
    yaml = pytest.importorskip("yaml")
    manifest = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "autoscaler" / "autoscaler.yaml"
    roles = [d for d in yaml.safe_load_all(manifest.read_text()) if d and d.get("kind") == "Role"]
    [role] = [r for r in roles if r["metadata"]["name"] == "lego-autoscaler"]
    granted = {(res, verb) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]}
    assert {("deployments", "list"), ("deployments/scale", "get"), ("deployments/scale", "patch")} <= granted


# --------------------------------------------------------------------------------------------
# compose: the Docker Engine API over httpx, answered by a mock transport

PROJECT = "deploy"


def _container(cid: str, service: str, number: int, state: str = "running", models: str = "") -> dict[str, Any]:
    labels = {
        "com.docker.compose.project": PROJECT,
        "com.docker.compose.service": service,
        "com.docker.compose.container-number": str(number),
        "io.legodiffusion.service": service.split("-")[0],
    }
    if models:
        labels["io.legodiffusion.models"] = models
    return {
        "Id": cid,
        "Names": [f"/{PROJECT}-{service}-{number}"],
        "Image": "legodiffusion:0.1.0",
        "Labels": labels,
        "State": state,
        "Status": "Up 5 minutes (healthy)" if state == "running" else "Exited (0)",
    }


CONTAINERS = [
    _container("aaa111", "encoder", 1, models="clip-l,clip-g,t5"),
    _container("bbb222", "denoiser-sd3-transformer", 1, models="sd3-transformer"),
    _container("ccc333", "denoiser-sd3-transformer", 2, models="sd3-transformer"),
    _container("ddd444", "denoiser-sd3-transformer", 3, state="exited", models="sd3-transformer"),
]

INSPECT_BBB = {
    "Id": "bbb222",
    "Name": f"/{PROJECT}-denoiser-sd3-transformer-1",
    "Config": {
        "Image": "legodiffusion:0.1.0",
        "Cmd": ["python", "-m", "services.denoiser", "--models", "sd3-transformer"],
        "Entrypoint": ["lego-entrypoint"],
        "Env": ["LEGO_NATS_URL=nats://nats:4222", "LEGO_TRANSPORT=tcp"],
        "User": "lego",
        "WorkingDir": "/app",
        "Labels": CONTAINERS[1]["Labels"],
        "Healthcheck": {"Test": ["CMD", "lego-probe", "listening"], "Interval": 10_000_000_000},
    },
    "HostConfig": {
        "Binds": ["deploy_model-cache:/var/cache/legodiffusion:rw"],
        "NetworkMode": f"{PROJECT}_default",
        "RestartPolicy": {"Name": "unless-stopped", "MaximumRetryCount": 0},
        "PortBindings": {},
    },
    "NetworkSettings": {"Networks": {f"{PROJECT}_default": {"Aliases": ["denoiser-sd3-transformer"]}}},
}


class DockerApi:
    """Answers the Docker Engine API requests the compose actuator sends, and records them."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path, method = request.url.path, request.method
        if method == "GET" and path == "/containers/json":
            labels = json.loads(request.url.params["filters"])["label"]
            assert f"com.docker.compose.project={PROJECT}" in labels
            service = next((x.split("=", 1)[1] for x in labels if x.startswith("com.docker.compose.service=")), None)
            return httpx.Response(
                200, json=[c for c in CONTAINERS if service in (None, c["Labels"]["com.docker.compose.service"])]
            )
        if method == "GET" and path == "/containers/bbb222/json":
            return httpx.Response(200, json=INSPECT_BBB)
        if method == "POST" and path == "/containers/create":
            return httpx.Response(201, json={"Id": "eee555", "Warnings": []})
        if method == "POST" and path.endswith(("/start", "/stop")):
            return httpx.Response(204)
        if method == "DELETE":
            return httpx.Response(204)
        return httpx.Response(404, json={"message": f"no route {method} {path}"})


@pytest.fixture
def compose() -> tuple[ComposeActuator, DockerApi]:
    api = DockerApi()
    client = httpx.Client(transport=httpx.MockTransport(api), base_url="http://docker")
    return ComposeActuator(project=PROJECT, client=client), api


def test_compose_finds_the_model_services_by_label(compose) -> None:
    actuator, _ = compose
    assert actuator.units() == {"encoder": ("clip-l", "clip-g", "t5"), "denoiser-sd3-transformer": ("sd3-transformer",)}
    assert actuator.current("denoiser-sd3-transformer") == 2  # the exited container does not count


def test_compose_scale_up_copies_the_first_container(compose) -> None:
    actuator, api = compose
    actuator.scale("denoiser-sd3-transformer", 3)
    [create] = [r for r in api.requests if r.url.path == "/containers/create"]
    assert create.url.params["name"] == f"{PROJECT}-denoiser-sd3-transformer-4"  # 1-3 are taken (3 exited)
    body = json.loads(create.content)
    assert body["Image"] == "legodiffusion:0.1.0"
    assert body["Cmd"] == INSPECT_BBB["Config"]["Cmd"] and body["Env"] == INSPECT_BBB["Config"]["Env"]
    assert body["Labels"]["com.docker.compose.container-number"] == "4"
    assert body["Labels"]["io.legodiffusion.models"] == "sd3-transformer"
    assert body["NetworkingConfig"] == {
        "EndpointsConfig": {f"{PROJECT}_default": {"Aliases": ["denoiser-sd3-transformer"]}}
    }
    assert (
        "PortBindings" not in body["HostConfig"] and body["HostConfig"]["Binds"] == INSPECT_BBB["HostConfig"]["Binds"]
    )
    assert any(r.method == "POST" and r.url.path == "/containers/eee555/start" for r in api.requests)


def test_compose_scale_down_stops_gracefully_then_removes_the_newest(compose) -> None:
    actuator, api = compose
    actuator.scale("denoiser-sd3-transformer", 1)
    assert actuator.current("denoiser-sd3-transformer") == 1 or any(
        r.method == "DELETE" for r in api.requests
    )  # counted as gone at once, while it finishes its step
    give_up = time.monotonic() + 10
    while time.monotonic() < give_up and not any(r.method == "DELETE" for r in api.requests):
        time.sleep(0.02)
    stop = next(r for r in api.requests if r.url.path.endswith("/stop"))
    assert stop.url.path == "/containers/ccc333/stop" and stop.url.params["t"] == "120"
    assert any(r.method == "DELETE" and r.url.path == "/containers/ccc333" for r in api.requests)
    assert not any(r.url.path.startswith("/containers/bbb222/stop") for r in api.requests)
