"""API keys without a server: the secret and its file, the limits' refusals."""

from __future__ import annotations

import hashlib

import pytest

from services.gateway.errors import APIError
from services.gateway.keys.limits import RateLimiter, check_in_flight, check_priority
from services.gateway.keys.model import KeyRecord, Scope
from services.gateway.keys.secret import ensure_key_file, hash_key, new_key


def _key(**limits: object) -> KeyRecord:
    return KeyRecord(key_id="key_1", name="alice", hash="h", scopes=[Scope.GENERATE], **limits)


def test_keys_are_random_and_stored_as_sha256():
    a, b = new_key(), new_key()
    assert a != b and a.startswith("lego-") and len(a) >= 40
    assert hash_key(a) == hashlib.sha256(a.encode()).hexdigest()


def test_the_admin_key_file_is_made_once_with_0600(tmp_path):
    path = tmp_path / "state" / "admin.key"
    key, made = ensure_key_file(path)
    assert made and path.stat().st_mode & 0o777 == 0o600
    assert ensure_key_file(path) == (key, False)  # a later start reads the same key


def test_the_rate_limit_refuses_with_retry_after():
    limiter, key = RateLimiter(), _key(rate_per_min=2)
    limiter.take(key, now=0.0)
    limiter.take(key, now=0.0)
    with pytest.raises(APIError) as refused:
        limiter.take(key, now=1.0)
    assert refused.value.status == 429 and refused.value.code == "rate_limited"
    assert refused.value.headers == {"Retry-After": "29"}  # one request comes back every 30 s
    limiter.take(key, now=31.0)


def test_in_flight_and_priority_caps_name_the_limit():
    with pytest.raises(APIError) as busy:
        check_in_flight(_key(max_in_flight=1), running=1)
    assert busy.value.status == 429 and "Retry-After" in (busy.value.headers or {})
    check_in_flight(_key(max_in_flight=0), running=100)  # 0: no limit
    with pytest.raises(APIError) as too_high:
        check_priority(_key(max_priority=3), 5)
    assert too_high.value.status == 403 and "max priority 3" in too_high.value.message
