"""Fuzzing the gateway from its own OpenAPI document (schemathesis) against a real mesh.

Every case, valid or not, must get an answer in time (no hang), never a 5xx, with a status
and a body the document declares (every error in the `{"error": {code, message}}` shape);
a body the document calls invalid must be refused with a 4xx.

`make test` runs LEGO_FUZZ_CASES=300 cases, derandomized (the same cases every run: no flaky
suite); `make fuzz` runs 3000 fresh ones. The counts are printed at the end either way.
"""

from __future__ import annotations

import base64
import io
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from pydantic import ValidationError
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from services.gateway.keys.gate import is_public
from services.gateway.schemas import ImageGenerationRequest
from tests.e2e.conftest import LockedGateway

CASES = int(os.environ.get("LEGO_FUZZ_CASES", "300"))
RANDOM = os.environ.get("LEGO_FUZZ_RANDOM", "") == "1"  # fresh cases (make fuzz); default: the same every run
REQUEST_TIMEOUT_S = 60.0  # a case not answered by then is a hang
GENERATE = "/v1/images/generations"
# Share of the cases of each operation with parameters but generation: those take an id or a
# name; generation, where the rules are, gets the rest (about 70%).
OTHER_SHARE = 0.075
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def fuzz_api_key(locked_gateway: LockedGateway) -> str:
    """The key valid cases send (`Tally.headers` sends an invalid one every INVALID_KEY_EVERY
    cases, which must be answered 401): a tenant's key, scope `generate` (the admin routes answer
    it 403, as documented), with no rate or in-flight limit so valid cases reach the models."""
    r = httpx.post(
        f"{locked_gateway.url}/v1/keys",
        json={"name": "fuzzer", "rate_per_min": 0, "max_in_flight": 0},
        headers={"Authorization": f"Bearer {locked_gateway.admin_key}"},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    return r.json()["key"]


INVALID_KEY_EVERY = 10


@dataclass
class Tally:
    """What the fuzzer sent and got, for the summary and the assertions."""

    api_key: str | None
    cases: int = 0
    modes: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    hangs: int = 0
    failures: list[str] = field(default_factory=list)
    async_ids: list[str] = field(default_factory=list)

    def headers(self) -> tuple[dict[str, str], bool]:
        """The Authorization header for the next case, and whether it carries a bad key."""
        if self.api_key is None:
            return {}, False
        if self.cases % INVALID_KEY_EVERY == 0:
            return {"Authorization": "Bearer not-a-key-of-this-gateway"}, True
        return {"Authorization": f"Bearer {self.api_key}"}, False

    def fail(self, case: schemathesis.Case, why: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(f"{why}\n  {case.as_curl_command()[:2000]}")

    def summary(self) -> str:
        by_status = ", ".join(f"{code}: {n}" for code, n in sorted(self.statuses.items()))
        server_errors = sum(n for code, n in self.statuses.items() if code >= 500)
        return (
            f"fuzz: {self.cases} cases ({', '.join(f'{m} {n}' for m, n in sorted(self.modes.items()))}); "
            f"by status: {by_status}; server errors: {server_errors}; hangs: {self.hangs}; "
            f"failed checks: {len(self.failures)}"
        )


def _png(width: int, height: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


CONTROL_64 = _png(64, 64)


def _body_is_positive(case: schemathesis.Case) -> bool:
    meta = case.meta
    if meta is None:
        return False
    modes = {loc.name.lower(): info.mode for loc, info in meta.components.items()}
    return modes.get("body", meta.generation.mode) is GenerationMode.POSITIVE


def cap_cost(case: schemathesis.Case) -> None:
    """Keep the mesh's work small: a VALID generation body (one the gateway's own schema takes)
    is made 64x64, one image, at most 2 steps, with a deadline of at least 60 s (a 1 s deadline
    on a shared 2-core box tests the box, not the gateway). Every other body goes as generated:
    validation is never weakened. Half the valid ControlNet bodies also get a real 64x64 PNG,
    since no generator draws a PNG from a JSON schema (the other half keep their bad image)."""
    body = case.body
    if case.path != GENERATE or not isinstance(body, dict) or not _body_is_positive(case):
        return
    try:
        parsed = ImageGenerationRequest.model_validate(body)
    except ValidationError:
        return
    body.update(size="64x64", n=1, num_inference_steps=min(parsed.num_inference_steps, 2))
    if parsed.timeout_s is not None:
        body["timeout_s"] = max(parsed.timeout_s, 60.0)
    controlnet = body.get("controlnet")
    if isinstance(controlnet, dict) and len(str(controlnet.get("image"))) % 2 == 0:
        controlnet["image"] = CONTROL_64


def run_case(case: schemathesis.Case, session: requests.Session, tally: Tally, base_url: str) -> None:
    """Send one case and check its answer; a failure is recorded, not raised, so that every
    case runs and the counts are complete."""
    cap_cost(case)
    headers, bad_key = tally.headers()
    tally.cases += 1
    tally.modes[case.meta.generation.mode.value if case.meta else "explicit"] += 1
    try:
        response = case.call(base_url, session=session, headers=headers, timeout=REQUEST_TIMEOUT_S)
    except requests.Timeout:
        tally.hangs += 1
        tally.fail(case, f"no answer within {REQUEST_TIMEOUT_S:g}s")
        return
    tally.statuses[response.status_code] += 1
    if response.status_code == 202:
        tally.async_ids.append(response.json()["request_id"])
    if bad_key and not is_public(case.path) and response.status_code != 401:
        tally.fail(case, f"an invalid API key got {response.status_code}, not 401")
    try:
        case.validate_response(response, checks=CHECKS, headers=headers)
    except Exception as exc:  # schemathesis' FailureGroup, or an AssertionError
        tally.fail(case, f"{response.status_code} {response.text[:300]}\n  {exc}")


def _budgets(doc: dict[str, Any]) -> Iterator[tuple[str, str, int]]:
    """(method, path, cases) for every operation but generation: 2 for one without inputs
    (there is nothing to vary), OTHER_SHARE of the cases for the others. Generation gets the
    rest (run last, so the total is CASES even where an operation runs out of new cases)."""
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if path != GENERATE:
                yield method.upper(), path, int(CASES * OTHER_SHARE) if op.get("parameters") else 2


def _fuzz_operation(schema: Any, method: str, path: str, budget: int, run: Callable[[schemathesis.Case], None]) -> None:
    """`budget` cases of one operation, about half valid and half not (by the document)."""
    op = schema[path][method]
    for mode, examples in ((GenerationMode.POSITIVE, budget // 2), (GenerationMode.NEGATIVE, budget - budget // 2)):

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=not RANDOM,
            phases=[Phase.explicit, Phase.generate],  # no shrinking: failures are recorded, not raised
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy(mode))
        def fuzz(case: schemathesis.Case) -> None:
            run(case)

        try:
            fuzz()
        except Exception as exc:  # e.g. nothing negative to generate for an operation without inputs
            if "negative" not in str(exc).lower() and "unsatisfiable" not in type(exc).__name__.lower():
                raise


def _settle(url: str, open_url: str, key: str, ids: list[str], print_line: Callable[[str], None]) -> None:
    """Cancel the async requests the fuzzer started (they are its key's), so later tests find
    the mesh idle (the backlog is read through the shared mesh's keyless gateway)."""
    with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:
        for request_id in ids:
            client.delete(f"/v1/requests/{request_id}")
    with httpx.Client(base_url=open_url, timeout=30) as client:
        give_up = time.monotonic() + 120
        while time.monotonic() < give_up:
            consumers = client.get("/v1/status").json()["consumers"]
            if all(c["backlog"] == 0 for c in consumers):
                return
            time.sleep(0.2)
    print_line("fuzz: the mesh still had a backlog 120 s after the fuzzer stopped")


@pytest.mark.timeout(600 + int(CASES * 0.5))  # about 0.3 s a case on a 2-core box
def test_fuzz_the_gateway_from_its_openapi_document(locked_gateway, fuzz_api_key, pytestconfig):
    url = locked_gateway.url
    doc = httpx.get(f"{url}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(doc)
    tally = Tally(api_key=fuzz_api_key)
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    start = time.monotonic()
    with requests.Session() as session:
        for method, path, budget in _budgets(doc):
            _fuzz_operation(schema, method, path, budget, lambda case: run_case(case, session, tally, url))
        _fuzz_operation(schema, "POST", GENERATE, CASES - tally.cases, lambda case: run_case(case, session, tally, url))
    elapsed = time.monotonic() - start
    with capture.global_and_fixture_disabled():
        print(f"\n{tally.summary()}; {elapsed:.0f}s")
        _settle(url, locked_gateway.mesh.url, fuzz_api_key, tally.async_ids, print)
    assert tally.cases >= CASES * 0.95, tally.summary()
    assert not tally.failures, "\n".join(tally.failures)
