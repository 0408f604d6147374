"""The parallel degree of one request on a denoiser group: split it over several devices, or not.

Why a pure function in `shared/`: the denoiser replica that owns a group of k devices asks it
at each request's first step, and the cluster simulator (`services/autoscaler/simulator.py`)
asks the very same function for its simulated groups, so a rule judged at 1,000 simulated
GPUs is the rule the mesh runs. It lives here rather than in the autoscaler's package because
a service never imports another service; `services.autoscaler.policy` re-exports it, beside the
scaling rule it belongs with.

The rule, in the order it is applied:

1. Only the degrees the request can take (`allowed`: 1 always; 2 and 4 where its workflow can
   be split that way, see `services/denoiser/group/`) and that fit the group.
2. Fair share: with `busy` other requests in the group's hands, this one may take at most the
   largest allowed degree d with d x (busy + 1) <= k. Idle devices are put to work on a lone
   request; under load every device serves its own requests, since a split request costs more
   device-seconds (the exchange, a smaller matrix per device), and throughput is what a busy
   group must keep.
3. Fastest measured: among the allowed degrees up to the fair share, the one with the lowest
   known step time (`step_s`) is taken. A split is not always faster: on a small model the
   exchange costs more than the halved matrix saves (bench/RESULTS.md, "Parallel groups": a
   split step 1.5-2.9x an unsplit one on a tiny model), and then a lone request is better off on
   one device. Exploration: while some of those degrees have no measurement yet, the largest
   unmeasured one is taken, so a fresh group still splits its first lone request (as the fair
   share says) and a later lone request tries the smaller degrees once each. With nothing
   measured at all (`step_s` empty or None) the fair share is taken.
4. Deadline rescue: when the degree so chosen would miss the request's deadline (`slack_s` below
   the estimated time at that degree) and a larger allowed degree would meet it, the smallest
   such degree is taken while the group is not saturated (busy < k): a request about to miss its
   SLO borrows devices that would otherwise only queue work behind it. Only devices the other
   requests leave free (k - busy at most: each holds one at least) are borrowed: a degree beyond
   them would share a device with a running request, every step of the split request waiting on
   that device's other work, so it would finish no sooner than at its fair share (the estimate
   assumes d idle devices) and would slow the other request too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class DegreeInputs:
    """What the group knows when a request takes its first step.

    `group_size`: devices in the group (k). `allowed`: the degrees this request can be split to.
    `busy`: the other requests the group holds now (running or waiting in its hands).
    `slack_s`: seconds left before the request's deadline (None: no deadline known).
    `steps`: its denoising steps. `step_s`: seconds per step at each degree when measured
    (profile or running mean), missing degrees unknown.
    """

    group_size: int
    allowed: tuple[int, ...]
    busy: int = 0
    slack_s: float | None = None
    steps: int = 1
    step_s: Mapping[int, float] | None = None


@dataclass(frozen=True)
class DegreeChoice:
    """The degree chosen, and why (a short phrase for the log and the simulator's trace)."""

    degree: int
    reason: str


# How a group picks degrees: `adaptive` (the rule above), `never` (every request on one
# device), `always` (every request split as far as it can be). The fixed modes are the
# baselines the adaptive rule is measured against (bench/parallel.py).
MODES = ("adaptive", "never", "always")


def degree_at_most(n: int) -> int:
    """The largest of the degrees a group hands out (4, 2, 1) not above `n` (1 at least): the
    degree a split request shrinks or grows to when the fair share is `n` devices."""
    return next(d for d in (4, 2, 1) if d <= max(n, 1))


def usable_degrees(inputs: DegreeInputs) -> list[int]:
    """The allowed degrees that fit the group, ascending; always at least [1]."""
    return sorted({d for d in inputs.allowed if 1 <= d <= inputs.group_size} | {1})


def _estimate_s(inputs: DegreeInputs, degree: int) -> float | None:
    if not inputs.step_s or degree not in inputs.step_s:
        return None
    return inputs.steps * inputs.step_s[degree]


def _ms(step_s: float) -> str:
    return f"{step_s * 1000:.1f} ms/step"


def _measured_choice(inputs: DegreeInputs, candidates: list[int], fair: DegreeChoice) -> DegreeChoice:
    """Rule 3: the fastest measured degree up to the fair share, or the largest not yet measured."""
    step_s = inputs.step_s
    if not step_s or len(candidates) == 1:
        return fair
    unmeasured = [d for d in candidates if d not in step_s]
    if unmeasured:
        return DegreeChoice(unmeasured[-1], f"not yet measured: degree {unmeasured[-1]}")
    best = min(candidates, key=lambda d: (step_s[d], d))
    others = ", ".join(f"{d} ({_ms(step_s[d])})" for d in sorted(candidates, key=lambda d: -d) if d != best)
    if best == fair.degree:  # the fair share is also the fastest: it keeps its name (the simulator counts them)
        return DegreeChoice(best, f"{fair.reason}; fastest measured: {_ms(step_s[best])} over {others}")
    return DegreeChoice(best, f"fastest measured: degree {best} ({_ms(step_s[best])}) over {others}")


def choose_degree(inputs: DegreeInputs, mode: str = "adaptive") -> DegreeChoice:
    """The degree for one request (see the module's docstring for the rule)."""
    degrees = usable_degrees(inputs)
    if mode == "never":
        return DegreeChoice(1, "never split")
    if mode == "always":
        return DegreeChoice(degrees[-1], "always split")
    if mode != "adaptive":
        raise ValueError(f"parallel mode {mode!r}: use one of {', '.join(MODES)}")
    share = inputs.group_size // (max(inputs.busy, 0) + 1)
    candidates = [d for d in degrees if d <= max(share, 1)]
    fair = DegreeChoice(candidates[-1], f"fair share: {inputs.busy} other request(s) on {inputs.group_size} device(s)")
    chosen = _measured_choice(inputs, candidates, fair)
    if inputs.slack_s is None or inputs.busy >= inputs.group_size:
        return chosen
    at_chosen = _estimate_s(inputs, chosen.degree)
    if at_chosen is None or at_chosen <= inputs.slack_s:
        return chosen
    free = inputs.group_size - max(inputs.busy, 0)
    for d in degrees:
        est = _estimate_s(inputs, d)
        if chosen.degree < d <= free and est is not None and est <= inputs.slack_s:
            return DegreeChoice(
                d, f"deadline rescue: {at_chosen:.2f} s at degree {chosen.degree} > {inputs.slack_s:.2f} s slack"
            )
    return chosen
