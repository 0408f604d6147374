"""The autoscaling policy as a pure function: rate x service time at a target utilisation,
backlog drained within the SLO, up at once and down after a cooldown, min/max, memory budget."""

from __future__ import annotations

import pytest

from services.autoscaler.policy import (
    Limits,
    PolicyConfig,
    ScalePolicy,
    Slo,
    UnitSignal,
    parse_limits,
)
from services.autoscaler.signals import RateMeter

GIB = 2**30


def config(**kw) -> PolicyConfig:
    base = dict(slo=Slo(factor=5.0), utilisation=0.5, cooldown_s=10.0, default_limits=Limits(1, 10))
    base.update(kw)
    return PolicyConfig(**base)


def unit(name: str = "den", current: int = 1, **kw) -> UnitSignal:
    return UnitSignal(unit=name, current=current, **kw)


def decide(policy: ScalePolicy, *signals: UnitSignal, now: float = 0.0) -> dict[str, int]:
    return {d.unit: d.target for d in policy.decide(list(signals), now)}


def test_arrival_rate_times_service_time_over_utilisation() -> None:
    policy = ScalePolicy(config())
    # 3 steps/s x 0.5 s = 1.5 busy replicas; at 50% utilisation: 3.
    [d] = policy.decide([unit(arrival_rate=3.0, load=1.5, service_s=0.5)], 0.0)
    assert d.target == 3 and d.changed
    assert "3.00/s x 0.500s / 0.5 = 3.00" in d.reason


def test_backlog_drains_within_the_slo() -> None:
    # 5x SLO with a 1 s step: 4 s to drain; 12 queued steps of 1 s -> 3 replicas.
    policy = ScalePolicy(config())
    assert decide(policy, unit(backlog=12, work_s=12.0, service_s=1.0)) == {"den": 3}
    # An absolute SLO: 2 s to drain 12 s of work -> 6.
    policy = ScalePolicy(config(slo=Slo(seconds=2.0)))
    assert decide(policy, unit(backlog=12, work_s=12.0, service_s=1.0)) == {"den": 6}
    # Arrivals and backlog add up: 1.5/0.5 + 12/4.
    policy = ScalePolicy(config())
    assert decide(policy, unit(backlog=12, work_s=12.0, load=1.5, service_s=1.0)) == {"den": 6}


def test_a_fast_stage_does_not_scale_on_a_long_quickly_drained_queue() -> None:
    """48 queued encodes at 10 ms are 0.48 s of work: well inside the slack a request has
    (4 x the 1 s denoising loop), so the encoder stays at one replica while the denoiser grows."""
    policy = ScalePolicy(config())
    targets = decide(
        policy,
        unit("encoder", backlog=48, work_s=0.48, service_s=0.01),
        unit("den", backlog=16, work_s=16.0, service_s=1.0),
    )
    assert targets == {"encoder": 1, "den": 4}


def test_unmeasured_step_time_counts_as_the_default() -> None:
    policy = ScalePolicy(config(default_service_s=2.0))
    # No replica measured anything: the solo latency is the default (2 s) -> 8 s to drain.
    assert decide(policy, unit(backlog=4, work_s=16.0)) == {"den": 2}


def test_any_backlog_asks_for_one_replica_and_idle_falls_to_the_minimum() -> None:
    policy = ScalePolicy(config(default_limits=Limits(0, 5)))
    assert decide(policy, unit(current=0, backlog=1, work_s=0.001, service_s=0.001)) == {"den": 1}
    policy = ScalePolicy(config(default_limits=Limits(2, 5), cooldown_s=0))
    assert decide(policy, unit(current=4)) == {"den": 2}


def test_up_at_once_down_after_the_cooldown_one_step_per_cooldown() -> None:
    policy = ScalePolicy(config(cooldown_s=10.0))
    busy = unit(current=1, backlog=12, work_s=12.0, service_s=1.0)
    assert decide(policy, busy, now=0.0) == {"den": 3}  # up at once
    idle = unit(current=3, service_s=1.0)
    assert decide(policy, idle, now=1.0) == {"den": 3}  # wants 1: held
    assert decide(policy, idle, now=6.0) == {"den": 3}
    # A blip of demand inside the window sets the floor of the next step down.
    blip = unit(current=3, backlog=8, work_s=8.0, service_s=1.0)
    assert decide(policy, blip, now=7.0) == {"den": 3}
    assert decide(policy, idle, now=11.5) == {"den": 2}  # 10 s below 3; the window's peak was 2
    assert decide(policy, unit(current=2, service_s=1.0), now=12.0) == {"den": 2}  # a new cooldown
    assert decide(policy, unit(current=2, service_s=1.0), now=21.6) == {"den": 1}
    # Demand again resets the cooldown: up at once.
    assert decide(policy, unit(current=1, backlog=20, work_s=20.0, service_s=1.0), now=22.0) == {"den": 5}


def test_a_rise_during_the_cooldown_restarts_it() -> None:
    policy = ScalePolicy(config(cooldown_s=10.0))
    assert decide(policy, unit(current=3, service_s=1.0), now=0.0) == {"den": 3}
    assert decide(policy, unit(current=3, backlog=12, work_s=12.0, service_s=1.0), now=5.0) == {"den": 3}
    # Wanting 3 again at 5 s ended the first window; the next one starts at 10.5 s.
    assert decide(policy, unit(current=3, service_s=1.0), now=10.5) == {"den": 3}
    assert decide(policy, unit(current=3, service_s=1.0), now=15.6) == {"den": 3}
    assert decide(policy, unit(current=3, service_s=1.0), now=20.6) == {"den": 1}


def test_min_and_max_per_unit() -> None:
    cfg = config(default_limits=Limits(1, 2), limits={"vae": Limits(2, 4)})
    policy = ScalePolicy(cfg)
    [den, vae] = policy.decide(
        [unit("den", backlog=40, work_s=40.0, service_s=1.0), unit("vae", current=1, service_s=0.1)], 0.0
    )
    assert (den.target, vae.target) == (2, 2)
    assert "clamped to [1, 2] -> 2" in den.reason and "clamped to [2, 4] -> 2" in vae.reason
    # A max lowered below what runs applies at once, cooldown or not.
    policy = ScalePolicy(config(default_limits=Limits(1, 2), cooldown_s=100))
    assert decide(policy, unit(current=5, backlog=40, work_s=40.0, service_s=1.0)) == {"den": 2}


def test_memory_budget_refuses_replicas_that_do_not_fit() -> None:
    policy = ScalePolicy(config(memory_budget_bytes=10 * GIB))
    [d] = policy.decide([unit(backlog=40, work_s=40.0, service_s=1.0, memory_bytes=3 * GIB)], 0.0)
    assert d.desired == 10 and d.target == 3  # 3 x 3 GiB fit in 10 GiB, a fourth does not
    assert "memory budget" in d.reason


def test_memory_budget_gives_every_unit_with_work_a_first_replica_before_seconds() -> None:
    """The monolithic case: a workflow with no replica gets one before a busy one gets more."""
    policy = ScalePolicy(config(memory_budget_bytes=10 * GIB, default_limits=Limits(0, 5)))
    targets = decide(
        policy,
        unit("mono-sd3", current=2, backlog=30, work_s=30.0, service_s=1.0, memory_bytes=4 * GIB),
        unit("mono-flux", current=0, backlog=1, work_s=1.0, service_s=1.0, memory_bytes=5 * GIB),
    )
    assert targets == {"mono-sd3": 1, "mono-flux": 1}


def test_memory_held_only_by_the_cooldown_goes_to_a_unit_that_needs_it() -> None:
    policy = ScalePolicy(config(memory_budget_bytes=10 * GIB, default_limits=Limits(0, 5), cooldown_s=60))
    # mono-sd35 is idle but inside its cooldown: it would keep its replica...
    assert decide(policy, unit("mono-sd35", current=1, memory_bytes=6 * GIB, service_s=1.0), now=0) == {"mono-sd35": 1}
    # ... until mono-flux has work and no room: then it is stopped at once.
    targets = decide(
        policy,
        unit("mono-sd35", current=1, memory_bytes=6 * GIB, service_s=1.0),
        unit("mono-flux", current=0, backlog=2, work_s=2.0, service_s=1.0, memory_bytes=5 * GIB),
        now=1.0,
    )
    assert targets == {"mono-sd35": 0, "mono-flux": 1}


def test_memory_budget_is_per_device_and_never_refuses_the_minimum() -> None:
    policy = ScalePolicy(config(memory_budget_bytes=4 * GIB, default_limits=Limits(1, 5)))
    targets = decide(
        policy,
        unit("a", backlog=20, work_s=20.0, service_s=1.0, memory_bytes=3 * GIB, device="cuda:0"),
        unit("b", backlog=20, work_s=20.0, service_s=1.0, memory_bytes=3 * GIB, device="cuda:1"),
        unit("big", current=1, memory_bytes=8 * GIB, device="cuda:2"),
    )
    assert targets == {"a": 1, "b": 1, "big": 1}


def test_slo_and_limit_parsing() -> None:
    assert Slo.parse("5x") == Slo(factor=5.0) and str(Slo.parse("5x")) == "5x solo latency"
    assert Slo.parse("12s") == Slo(seconds=12.0) and Slo.parse("2.5") == Slo(seconds=2.5)
    for bad in ("", "x", "0s", "1x", "-3"):
        with pytest.raises(ValueError):
            Slo.parse(bad)
    assert parse_limits("3", 1) == (3, {})
    assert parse_limits("1,sd3-transformer=2", 9) == (1, {"sd3-transformer": 2})
    assert parse_limits("", 7) == (7, {})
    with pytest.raises(ValueError):
        parse_limits("many", 1)
    with pytest.raises(ValueError):
        Limits(3, 2)


def test_rate_meter_over_a_sliding_window() -> None:
    meter = RateMeter(window_s=10.0)
    assert meter.add(0.0, 100) == 0.0
    assert meter.add(5.0, 150) == pytest.approx(10.0)
    assert meter.add(10.0, 200) == pytest.approx(10.0)
    assert meter.add(20.0, 200) == pytest.approx(0.0)  # the burst left the window
    assert meter.add(21.0, 5) == 0.0  # counter went down: the consumer was recreated


def test_admitted_requests_scale_a_later_stage_before_its_steps_arrive() -> None:
    """A denoiser behind the text encoders sees no step yet, but the 4 requests a second the
    gateways admitted are 4 of its steps a second within moments: it scales for them now."""
    from services.autoscaler.policy import ConsumerLoad, unit_signal

    waiting = ConsumerLoad(backlog=0, arrival_rate=0.0, step_s=2.0, expected_rate=4.0)
    signal = unit_signal("den", 1, [waiting])
    assert signal.load == 8.0 and signal.arrival_rate == 4.0
    assert decide(ScalePolicy(config()), signal) == {"den": 10}  # 8 busy replicas at 50%: 16, max 10
    unseen = unit_signal("den", 1, [ConsumerLoad(backlog=0, arrival_rate=0.0, step_s=2.0)])
    assert decide(ScalePolicy(config()), unseen) == {"den": 1}  # without admissions: nothing to go on


def test_arrivals_above_what_admissions_foresee_are_planned_for_as_seen() -> None:
    from services.autoscaler.policy import ConsumerLoad

    assert ConsumerLoad(backlog=0, arrival_rate=3.0, step_s=1.0, expected_rate=1.0).rate == 3.0
    assert ConsumerLoad(backlog=0, arrival_rate=3.0, step_s=1.0).rate == 3.0


def test_a_warm_fill_shares_the_free_budget_by_load_and_yields_it_to_wanted_replicas() -> None:
    """warm_fill 0.5 of a 40 GiB budget: 20 GiB kept filled. 'big' wants 2 x 4 GiB, 'small' and
    'idle' 1 x 1 GiB each; the 10 GiB left go 3:1 by their loads: 'big' 7.5 GiB -> 1 warm
    replica, 'small' 2.5 GiB -> 2. A unit with no load gets none; with the fill off, nobody does."""
    signals = [
        unit("big", current=2, load=1.2, service_s=1.0, memory_bytes=4 * GIB),
        unit("small", current=1, load=0.4, service_s=1.0, memory_bytes=1 * GIB),
        unit("idle", current=1, load=0.0, service_s=1.0, memory_bytes=1 * GIB),
    ]
    cfg = config(utilisation=0.6, memory_budget_bytes=40 * GIB, default_limits=Limits(1, 10))
    assert decide(ScalePolicy(cfg), *signals) == {"big": 2, "small": 1, "idle": 1}
    warm = ScalePolicy(
        config(utilisation=0.6, memory_budget_bytes=40 * GIB, default_limits=Limits(1, 10), warm_fill=0.5)
    )
    [big, small, idle] = warm.decide(signals, 0.0)
    assert (big.target, small.target, idle.target) == (3, 3, 1)
    assert big.desired == 2 and "+ 1 warm" in big.reason  # what the load asks stays apart
    # a unit whose load needs the memory takes it first: warm replicas are granted last
    pressed = unit("big", current=2, load=7.2, service_s=1.0, memory_bytes=4 * GIB)  # wants 10 x 4 GiB
    [big, small, idle] = warm.decide([pressed, *signals[1:]], 1.0)
    # the minimums (1 GiB each) first, then big's wanted replicas up to the 40 GiB: no warm one
    assert (big.target, small.target, idle.target) == (9, 1, 1) and "warm" not in small.reason
    with pytest.raises(ValueError, match=r"warm fill 1\.5"):
        config(warm_fill=1.5)


def test_the_warm_pool_comes_from_the_settings() -> None:
    from services.autoscaler.controller import policy_config
    from shared.settings import Settings

    env = {"LEGO_AUTOSCALE_WARM_FILL": "0.8", "LEGO_AUTOSCALE_MEMORY_BUDGET_GB": "1"}
    assert policy_config(Settings.from_env(env)).warm_fill == 0.8
    assert policy_config(Settings.from_env({})).warm_fill == 0.0
