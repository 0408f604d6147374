"""API keys, as a tenant and an operator meet them: a gateway with keys on beside the shared
mesh's (its admin key made in the run's temporary state dir), keys made through `/v1/keys` and
`lego keys`, another keyed gateway on the same NATS for revocation, and the real OpenAI client."""

from __future__ import annotations

import base64
import io
import signal
import time

import httpx
import pytest

from lego.cli import build_parser
from lego.launcher import free_port
from tests.e2e.conftest import LockedGateway
from tests.waiting import wait_for

PROBES = {"/healthz", "/readyz", "/metrics"}
IMAGE_LINKS = "/v1/images/files/{file_id}"  # public: the link's random token is the capability
QUICK = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 1}


@pytest.fixture(scope="module")
def locked(locked_gateway: LockedGateway) -> LockedGateway:
    return locked_gateway


@pytest.fixture(scope="module")
def admin(locked: LockedGateway) -> dict[str, str]:
    key_file = locked.mesh.admin_key_file
    assert key_file is not None and key_file.stat().st_mode & 0o777 == 0o600
    return {"Authorization": f"Bearer {locked.admin_key}"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def make_key(mesh: LockedGateway, admin: dict[str, str], name: str, **limits: object) -> str:
    r = httpx.post(f"{mesh.url}/v1/keys", json={"name": name, **limits}, headers=admin, timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["key"]


def test_every_route_but_the_probes_refuses_a_request_without_a_valid_key(locked):
    doc = httpx.get(f"{locked.url}/openapi.json", timeout=10).json()
    routes = [(path, method) for path, ops in doc["paths"].items() for method in ops]
    assert {p for p, _ in routes} - PROBES, "the document lists the API's routes"
    for path, method in routes:
        if path in PROBES or path == IMAGE_LINKS:
            continue
        url = locked.url + path.replace("{request_id}", "some-id").replace("{name}", "some-name")
        for headers in ({}, bearer("lego-not-a-key"), {"Authorization": "Basic YWRtaW46YWRtaW4="}):
            r = httpx.request(method.upper(), url, headers=headers, timeout=10)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert r.json()["error"]["code"] == "invalid_api_key"
    # Before its body is read: an anonymous caller learns nothing of the API's validation.
    for body in (b"{not json", b"[" * 100, b'{"prompt": ""}'):
        r = httpx.post(f"{locked.url}/v1/images/generations", content=body, headers=bearer("lego-no"), timeout=10)
        assert r.status_code == 401, (body, r.text)
    assert httpx.get(f"{locked.url}/v1/no-such-route", timeout=10).status_code == 401
    for probe in PROBES:
        assert httpx.get(locked.url + probe, timeout=10).status_code == 200, probe
    unknown = httpx.get(locked.url + IMAGE_LINKS.replace("{file_id}", "not-a-link.png"), timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "image_not_found"


def test_a_key_without_the_scope_or_the_priority_is_refused_with_403(locked, admin):
    user = bearer(make_key(locked, admin, "scoped-user"))
    for path in ("/v1/keys", "/v1/status", "/v1/models"):  # the operator's routes
        r = httpx.get(locked.url + path, headers=user, timeout=10)
        assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope", (path, r.text)
    assert httpx.get(f"{locked.url}/v1/workflows", headers=user, timeout=10).status_code == 200
    too_high = httpx.post(
        f"{locked.url}/v1/images/generations", json={**QUICK, "priority": 5}, headers=user, timeout=30
    )
    assert too_high.status_code == 403 and "max priority 0" in too_high.json()["error"]["message"]
    ops = bearer(make_key(locked, admin, "ops-only", scopes=["admin"]))
    r = httpx.post(f"{locked.url}/v1/images/generations", json=QUICK, headers=ops, timeout=30)
    assert r.status_code == 403 and "'generate'" in r.json()["error"]["message"]


def test_a_key_over_its_rate_gets_429_with_retry_after(locked, admin):
    slow = bearer(make_key(locked, admin, "one-a-minute", rate_per_min=1))
    url = f"{locked.url}/v1/images/generations"
    assert httpx.post(url, json=QUICK, headers=slow, timeout=120).status_code == 200
    r = httpx.post(url, json=QUICK, headers=slow, timeout=30)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited", r.text
    assert 0 < int(r.headers["Retry-After"]) <= 60


def test_a_key_sees_and_cancels_only_its_own_requests(locked, admin):
    alice = bearer(make_key(locked, admin, "alice", max_in_flight=1))
    bob = bearer(make_key(locked, admin, "bob"))
    url = f"{locked.url}/v1/images/generations"
    long = {"prompt": "a long night", "size": "512x512", "num_inference_steps": 100, "wait": False}
    accepted = httpx.post(url, json=long, headers={**alice, "X-Request-Id": "shared-id"}, timeout=30)
    assert accepted.status_code == 202, accepted.text
    busy = httpx.post(url, json=long, headers=alice, timeout=30)  # her one slot is taken
    assert (
        busy.status_code == 429 and busy.json()["error"]["code"] == "too_many_in_flight" and busy.headers["Retry-After"]
    )
    unknown = {"error": {"code": "unknown_request", "message": "no request 'shared-id'"}}
    base = f"{locked.url}/v1/requests/shared-id"
    for method, path in (("GET", base), ("GET", f"{base}/events"), ("DELETE", base)):
        r = httpx.request(method, path, headers=bob, timeout=10)
        assert (r.status_code, r.json()) == (404, unknown), (method, path)
    # Bob's ids are his own: the same id is a new request of his, not a clash with Alice's.
    mine = httpx.post(url, json=QUICK, headers={**bob, "X-Request-Id": "shared-id"}, timeout=120)
    assert mine.status_code == 200, mine.text
    assert httpx.get(base, headers=alice, timeout=10).json()["workflow"] == "sd3"
    cancelled = httpx.delete(base, headers=alice, timeout=30)
    assert cancelled.status_code in (200, 409), cancelled.text  # 409: it ended meanwhile
    assert httpx.get(base, headers=bob, timeout=10).json()["status"] == "succeeded"


def test_a_revoked_key_is_refused_by_every_gateway_within_seconds(locked, admin, tmp_path):
    port = free_port()
    second = locked.mesh.add_gateway("gateway-2", port, auth=True)
    try:
        other = f"http://127.0.0.1:{port}"

        def answer(headers: dict[str, str]) -> int:
            try:
                return httpx.get(f"{other}/v1/workflows", headers=headers, timeout=5).status_code
            except httpx.HTTPError:
                assert second.alive(), "the second gateway exited; see gateway-2.log"
                return 0

        key = bearer(make_key(locked, admin, "roaming"))
        wait_for("the second gateway to accept the new key", lambda: answer(key) == 200, timeout_s=60)
        revoked = httpx.delete(f"{locked.url}/v1/keys/roaming", headers=admin, timeout=10)
        assert revoked.status_code == 200, revoked.text
        since = time.monotonic()
        wait_for("the second gateway to refuse the revoked key", lambda: answer(key) == 401, timeout_s=5)
        assert time.monotonic() - since < 5
        assert httpx.get(f"{locked.url}/v1/workflows", headers=key, timeout=5).status_code == 401
    finally:
        second.signal_group(signal.SIGKILL)
        assert second.proc is not None
        second.proc.wait(timeout=10)
        locked.mesh.children.remove(second)


def test_the_openai_client_generates_and_metrics_count_by_key_name(locked, admin):
    import openai
    from PIL import Image

    key = make_key(locked, admin, "openai-user")
    client = openai.OpenAI(base_url=f"{locked.url}/v1", api_key=key, max_retries=0, timeout=120)
    result = client.images.generate(
        model="sd3", prompt="a lighthouse", size="64x64", extra_body={"num_inference_steps": 2, "seed": 7}
    )
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.size == (64, 64)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{locked.url}/v1", api_key="lego-wrong", max_retries=0).images.generate(
            model="sd3", prompt="a lighthouse", size="64x64"
        )
    metrics = httpx.get(f"{locked.url}/metrics", timeout=10).text
    assert 'lego_key_requests_total{key="openai-user",status="succeeded"} 1.0' in metrics
    assert 'lego_key_images_total{key="openai-user"} 1.0' in metrics
    gpu_s = next(
        line for line in metrics.splitlines() if line.startswith('lego_key_gpu_seconds_total{key="openai-user"}')
    )
    assert float(gpu_s.split()[-1]) > 0
    assert key not in metrics and admin["Authorization"].split()[1] not in metrics
    logs = "".join(p.read_text() for p in locked.mesh.config.log_dir.glob("*.log"))
    assert key not in logs and admin["Authorization"].split()[1] not in logs, "a key reached a log"


def test_lego_keys_create_list_revoke(locked, admin, monkeypatch, capsys):
    def lego(*argv: str) -> int:
        return build_parser().parse_args(list(argv)).func(build_parser().parse_args(list(argv)))

    # No --api-key and no LEGO_API_KEY: the admin key file of the state dir is sent.
    monkeypatch.delenv("LEGO_API_KEY", raising=False)
    assert locked.mesh.admin_key_file is not None
    monkeypatch.setenv("LEGO_STATE_DIR", str(locked.mesh.admin_key_file.parent))
    assert lego("keys", "--url", locked.url, "create", "cli-user", "--rate", "5") == 0
    made = capsys.readouterr()
    key = made.out.strip()
    assert key.startswith("lego-") and "shown this once" in made.err
    assert lego("keys", "--url", locked.url, "list") == 0
    listed = capsys.readouterr().out
    assert "cli-user" in listed and "admin" in listed and key not in listed
    assert httpx.get(f"{locked.url}/v1/workflows", headers=bearer(key), timeout=10).status_code == 200
    assert lego("keys", "--url", locked.url, "--api-key", key, "list") == 1  # not an admin key
    assert "insufficient_scope" in capsys.readouterr().err
    assert lego("keys", "--url", locked.url, "revoke", "cli-user") == 0
    assert httpx.get(f"{locked.url}/v1/workflows", headers=bearer(key), timeout=10).status_code == 401
