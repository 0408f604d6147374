"""The Kubernetes actuator: one Deployment per unit, scaled through its `scale` subresource with
the official `kubernetes` client (extra `.[autoscaler]`).

It scales the Deployments of its namespace labelled `legodiffusion.io/scalable=true`; the
annotation `legodiffusion.io/models` names the models each one's pods host (deploy/k8s/4x-*.yaml).
What it needs from RBAC is what deploy/k8s/autoscaler/autoscaler.yaml grants: get/list on
`deployments`, get/patch on `deployments/scale`. Pods that are told to stop get SIGTERM and
`terminationGracePeriodSeconds` (120 s in the manifests) to finish the step in hand.

No cluster is reachable here: tests/unit/test_autoscaler_actuators.py runs this code against
canned API-server answers (written to the API's documented shapes, not captured from a live
cluster) at the HTTP layer of the client, so the requests it sends are checked too.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

log = logging.getLogger("lego.autoscaler.kubernetes")

SCALABLE_LABEL = "legodiffusion.io/scalable=true"
MODELS_ANNOTATION = "legodiffusion.io/models"


def default_namespace() -> str:
    """The pod's own namespace (POD_NAMESPACE from the downward API, or the service account's), else `lego`."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip() or "lego"
    except OSError:
        return "lego"


def apps_api() -> Any:
    """AppsV1Api from the in-cluster service account, or from ~/.kube/config outside a cluster."""
    try:
        from kubernetes import client, config
    except ImportError as exc:
        raise RuntimeError("the kubernetes actuator needs the kubernetes client: pip install '.[autoscaler]'") from exc
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.AppsV1Api()


class KubernetesActuator:
    name = "kubernetes"

    def __init__(self, namespace: str | None = None, api: Any = None, refresh_s: float = 30.0) -> None:
        self.namespace = namespace or default_namespace()
        self.api = api if api is not None else apps_api()
        self.refresh_s = refresh_s
        self._units: dict[str, tuple[str, ...]] = {}
        self._listed_at = float("-inf")

    def units(self) -> dict[str, tuple[str, ...]]:
        """The scalable Deployments (listed again every `refresh_s`: a new one is picked up)."""
        if time.monotonic() - self._listed_at >= self.refresh_s:
            found = self.api.list_namespaced_deployment(self.namespace, label_selector=SCALABLE_LABEL)
            units = {}
            for d in found.items:
                annotations = d.metadata.annotations or {}
                models = tuple(m.strip() for m in annotations.get(MODELS_ANNOTATION, "").split(",") if m.strip())
                if models:
                    units[d.metadata.name] = models
                else:
                    log.warning("deployment %s has no %s annotation; not scaled", d.metadata.name, MODELS_ANNOTATION)
            self._units, self._listed_at = units, time.monotonic()
        return dict(self._units)

    def current(self, unit: str) -> int:
        scale = self.api.read_namespaced_deployment_scale(unit, self.namespace)
        return int(scale.spec.replicas or 0)

    def scale(self, unit: str, replicas: int, share: float = 0.0) -> None:
        self.api.patch_namespaced_deployment_scale(unit, self.namespace, {"spec": {"replicas": int(replicas)}})
