"""The role table: what a role may not do is as much the contract as what it may."""

from __future__ import annotations

import pytest

from shared import bus_roles, subjects


def _publish(role: str) -> tuple[str, ...]:
    publish = bus_roles.permissions(role).publish
    assert publish is not None
    return publish


@pytest.mark.parametrize("role", sorted(bus_roles.SERVICE_KINDS))
def test_a_model_service_publishes_no_other_kind_of_step_and_never_reads_the_keys(role: str) -> None:
    publish = _publish(role)
    allowed_steps = {subjects.step_subjects_of_kind(k) for k in bus_roles.SERVICE_CALLS.get(role, ())}
    assert {p for p in publish if p.startswith("lego.step.")} == allowed_steps
    assert not any(subjects.KEYS_BUCKET in p for p in publish)
    assert not any(".STREAM.DELETE." in p or ".STREAM.UPDATE." in p or ".STREAM.CREATE." in p for p in publish)
    pulls = [p for p in publish if ".CONSUMER.MSG.NEXT.LEGO_STEPS." in p]
    assert pulls and all(p.rsplit(".", 1)[1].split("__")[0] in bus_roles.SERVICE_KINDS[role] for p in pulls)


@pytest.mark.parametrize("role", sorted(bus_roles.SERVICE_KINDS))
def test_a_model_service_hears_only_its_own_higher_bands(role: str) -> None:
    """Replicas listen to a higher band's subject while they trust it empty (priority_pull);
    the lowest band, where the bulk of the steps are, they never hear."""
    subscribe = bus_roles.permissions(role).subscribe
    assert subscribe is not None
    heard = {s for s in subscribe if s.startswith("lego.step.")}
    expected = {
        subjects.step_subject(kind, model, band)
        for kind, model in bus_roles.step_consumers(role)
        for band in subjects.BAND_NAMES[:-1]
    }
    assert heard == expected and expected
    assert all(s.endswith("." + subjects.BAND_NAMES[0]) for s in heard)


def test_the_denoiser_alone_calls_controlnet_steps() -> None:
    assert subjects.step_subjects_of_kind("controlnet") in _publish("denoiser")
    assert subjects.step_subjects_of_kind("controlnet") not in _publish("encoder")


def test_the_gateway_creates_streams_and_reads_keys_but_deletes_nothing() -> None:
    publish = _publish("gateway")
    assert subjects.STEP_SUBJECTS in publish
    assert subjects.js_stream_api("CREATE", subjects.STEP_STREAM) in publish
    assert subjects.kv_subject(subjects.KEYS_BUCKET) in publish
    assert not any(".DELETE." in p and "CONSUMER" not in p for p in publish)


def test_who_creates_streams() -> None:
    assert bus_roles.may_create_streams("")  # an open bus: as before the lock
    assert bus_roles.may_create_streams("admin") and bus_roles.may_create_streams("gateway")
    assert not bus_roles.may_create_streams("encoder") and not bus_roles.may_create_streams("autoscaler")
    with pytest.raises(ValueError, match="unknown bus role"):
        bus_roles.permissions("intruder")
