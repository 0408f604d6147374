from __future__ import annotations

import pytest

from shared import subjects
from shared.settings import Settings


def test_subject_names():
    assert subjects.step_subject("encode", "clip-l") == "lego.step.encode.clip-l"
    assert subjects.consumer_name("denoise", "sd3-transformer") == "denoise__sd3-transformer"
    assert subjects.result_subject("gw-1") == "lego.result.gw-1"


@pytest.mark.parametrize("bad", ["a.b", "a b", "*", ">", ""])
def test_subject_tokens_cannot_inject_wildcards(bad):
    with pytest.raises(ValueError, match="subject token"):
        subjects.step_subject("encode", bad)


def test_settings_from_env_and_overrides(monkeypatch):
    monkeypatch.setenv("LEGO_ACK_WAIT_S", "2.5")
    monkeypatch.setenv("LEGO_MAX_DELIVER", "3")
    s = Settings.from_env(nats_url="nats://example:1", device=None)
    assert (s.ack_wait_s, s.max_deliver, s.nats_url, s.device) == (2.5, 3, "nats://example:1", "cpu")
    monkeypatch.setenv("LEGO_MAX_DELIVER", "many")
    with pytest.raises(ValueError, match="LEGO_MAX_DELIVER"):
        Settings.from_env()


def test_settings_from_flags_takes_the_flags_named_after_a_setting(monkeypatch):
    """A flag given wins over the environment; one left out (None) does not; flags that are no
    setting (--models, --actuator) are left to their command."""
    import argparse

    monkeypatch.setenv("LEGO_DEVICE", "cuda:1")
    monkeypatch.setenv("LEGO_LOG_LEVEL", "DEBUG")
    flags = argparse.Namespace(nats_url="nats://flag:1", device=None, models="a,b", autoscale_cooldown_s=2.0)
    s = Settings.from_flags(flags)
    assert (s.nats_url, s.device, s.log_level, s.autoscale_cooldown_s) == ("nats://flag:1", "cuda:1", "DEBUG", 2.0)


def test_priority_bands_name_their_own_subjects_and_consumers():
    """Priority 5-9 queues on the high band's subject and consumer; 0-4 keep the band-less
    names existing streams and KEDA triggers use. Consumer names parse back to (kind, model, band)."""
    assert [subjects.band_of(p) for p in (0, 4, 5, 9)] == ["", "", "high", "high"]
    assert subjects.step_subject("denoise", "sd3-transformer", "high") == "lego.step.denoise.sd3-transformer.high"
    high = subjects.consumer_name("vae_decode", "sd3-vae", "high")
    assert high == "vae_decode__sd3-vae__high"
    assert subjects.parse_consumer_name(high) == ("vae_decode", "sd3-vae", "high")
    assert subjects.parse_consumer_name("denoise__sd3-transformer") == ("denoise", "sd3-transformer", "")
    assert subjects.parse_consumer_name("pipeline") is None
    assert subjects.bands_at_or_above(9) == ("high",) and subjects.bands_at_or_above(0) == ("high", "")
    with pytest.raises(ValueError, match="priority band"):
        subjects.step_subject("encode", "t5", "urgent")
    with pytest.raises(ValueError, match="names a priority band"):
        subjects.consumer_name("encode", "t5__high")


def test_nats_url_takes_one_server_or_a_cluster_list():
    from shared.bus import nats_servers

    assert nats_servers("nats://127.0.0.1:4222") == ["nats://127.0.0.1:4222"]
    cluster = "nats://a:4222, nats://b:4222,nats://c:4222"
    assert nats_servers(Settings.from_env({"LEGO_NATS_URL": cluster}).nats_url) == [
        "nats://a:4222",
        "nats://b:4222",
        "nats://c:4222",
    ]
    with pytest.raises(ValueError, match="LEGO_NATS_URL is empty"):
        nats_servers(" , ")
