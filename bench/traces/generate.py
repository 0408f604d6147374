"""Production-shaped request traces, generated from stated parameters and a seed.

Why: the cluster simulator and `lego up` replays must be judged on what production looks like,
not on a flat Poisson stream of six workflows. The published facts (Katz/SwiftDiffusion, ~550k
requests over 20 days from two production text-to-image services) fix the adapter side: more
than 98% of requests use at least one ControlNet, more than 95% at least one LoRA, about 150
ControlNets of which the top 9-11% take 95-98% of calls, about 14,500 LoRAs with skewed
popularity, batch size 1. Everything else (the base-model mix, adapters per request, the daily
rate curve, bursts, the hour-to-hour drift of the mix) is a choice, stated in `TraceParams`.

The process, all of it seeded (same params + seed -> byte-identical JSONL):
- Arrivals: a non-homogeneous Poisson process drawn by thinning. Rate
  `mean_rate * diurnal(t) * burst(t)`; `diurnal` is a cosine over a day of `day_s` seconds
  (86400 by default; e.g. 600 compresses a day into ten minutes for short runs) whose
  peak/trough ratio is `peak_to_trough` and whose mean over a day is 1; `burst` is
  `burst_multiplier` inside each burst window (`burst_s` long, placed uniformly at random,
  `bursts_per_day` of them a day, at least one in any trace when that is > 0), else 1.
- Base model: Zipf over `base_models` (rank r has weight r^-base_zipf_s), the log-weights
  doing a mean-reverting random walk from one trace hour (`day_s / 24`) to the next.
- ControlNets / LoRAs: with probability `p_controlnet` (`p_lora`) a request uses k >= 1 of them,
  k drawn from `controlnet_counts` (`lora_counts`: P(k=1), P(k=2), ...), k distinct ones drawn
  Zipf over the family's catalogue of `controlnets` (`loras`) adapters.

Names: adapters belong to a base model family (an SDXL ControlNet does not fit Flux), so they
are named `<family>/cn-NNN` and `<family>/lora-NNNNN`, NNN being the adapter's popularity rank
in its family (0 the most popular), zero-padded to the width of the catalogue size:
`sdxl/cn-017`, `flux/lora-01234`. `workflow` is our catalogue's workflow for the request
(`bench.traces.workflows.workflow_of`).

Speed: the work is done on numpy chunks of about `CHUNK_REQUESTS` candidate arrivals; the
JSONL lines are formatted directly (byte-identical to `TraceRequest.to_json`) so a trace of
millions of lines streams to disk without building a Python object a request. `chunks()` gives
the columnar chunks to consumers that want arrays (the simulator), `generate()` TraceRequests.
Measured on the 2-core dev box (shared, so noisy): one hour at a flat 300 req/s, 1.08M requests
(147 MB of JSONL), is written in 4-10 s; its chunks alone take 1 s, as TraceRequests 8 s.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from bench.traces.record import TraceRequest
from bench.traces.workflows import FAMILIES, workflow_of

# Candidate arrivals drawn per chunk: large enough that numpy does the work, small enough that
# a chunk's arrays stay a few MB. Part of the trace's definition (the chunking fixes the order
# in which random numbers are drawn), so changing it changes every trace.
CHUNK_REQUESTS = 65536


@dataclass(frozen=True)
class TraceParams:
    """Everything that shapes a trace. Defaults: the published facts, and stated choices."""

    hours: float = 1.0  # trace length, in trace hours (each `day_s / 24` seconds)
    mean_rate: float = 10.0  # requests/s averaged over a day, bursts excluded
    # Diurnal curve. Choice: a 3x peak/trough with the peak at 14:00 is typical of consumer
    # web services; the study does not publish its daily curve.
    day_s: float = 86400.0  # a day's length in trace seconds: 600 runs a whole day in 10 min
    peak_to_trough: float = 3.0
    peak_hour: float = 14.0
    start_hour: float = 0.0  # the hour of day the trace starts at
    # Bursts. Choice: a few flash crowds a day, each 4x the curve for two minutes.
    bursts_per_day: float = 4.0
    burst_multiplier: float = 4.0
    burst_s: float = 120.0  # trace seconds (not scaled with day_s)
    # Base models. Choice: Zipf s=1.5 in the order sdxl, sd15, flux, sd3, sd35-large gives
    # 57/20/11/7/5%: SDXL-dominant like the study's services (SDXL with ControlNets and LoRAs),
    # SD1.5 still common, the newer DiT families a growing minority.
    base_models: tuple[str, ...] = FAMILIES
    base_zipf_s: float = 1.5
    # Drift of the mix: per trace hour, log-weight x <- (1 - drift_revert) x + drift_sigma N(0, 1).
    # Choice: about +-15% an hour, reverting so a long trace keeps the mix it started with.
    drift_sigma: float = 0.15
    drift_revert: float = 0.2
    # ControlNets: published >98% of requests use one or more, ~150 of them, the top 10% taking
    # 95-98% of calls. Zipf s=2.15 over 150 puts 96.4% of calls on the top 15, measured after the
    # draw of distinct ones within a request (which flattens it: s=2.0 would give 94.6%).
    # Choice: 1, 2 or 3 per request (70/22/8%).
    p_controlnet: float = 0.985
    controlnets: int = 150
    controlnet_zipf_s: float = 2.15
    controlnet_counts: tuple[float, ...] = (0.70, 0.22, 0.08)
    # LoRAs: published >95% use one or more, ~14,500 of them, skewed popularity (the study
    # plots ~4,500 LoRAs covering nearly all calls). Choice: Zipf s=1.1 (top 10% take ~85%,
    # top 4,500 ~93%); 1, 2 or 3 per request (75/18/7%).
    p_lora: float = 0.965
    loras: int = 14500
    lora_zipf_s: float = 1.1
    lora_counts: tuple[float, ...] = (0.75, 0.18, 0.07)

    def __post_init__(self) -> None:
        checks = {
            "hours > 0": self.hours > 0,
            "mean_rate > 0": self.mean_rate > 0,
            "day_s > 0": self.day_s > 0,
            "peak_to_trough >= 1": self.peak_to_trough >= 1,
            "bursts_per_day >= 0": self.bursts_per_day >= 0,
            "burst_multiplier >= 1": self.burst_multiplier >= 1,
            "burst_s > 0": self.burst_s > 0,
            "base_models known": all(b in FAMILIES for b in self.base_models) and len(self.base_models) > 0,
            "0 <= p_controlnet <= 1": 0 <= self.p_controlnet <= 1,
            "0 <= p_lora <= 1": 0 <= self.p_lora <= 1,
            "controlnets >= len(controlnet_counts)": self.controlnets >= len(self.controlnet_counts) > 0,
            "loras >= len(lora_counts)": self.loras >= len(self.lora_counts) > 0,
            "counts sum to 1": all(
                abs(sum(c) - 1) < 1e-9 and min(c) >= 0 for c in (self.controlnet_counts, self.lora_counts)
            ),
            "0 <= drift_revert <= 1": 0 <= self.drift_revert <= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"TraceParams: need {', '.join(bad)}")

    @property
    def hour_s(self) -> float:
        return self.day_s / 24

    @property
    def duration_s(self) -> float:
        return self.hours * self.hour_s

    @property
    def amplitude(self) -> float:
        """The cosine's relative amplitude a: (1 + a) / (1 - a) = peak_to_trough."""
        return (self.peak_to_trough - 1) / (self.peak_to_trough + 1)

    @property
    def max_rate(self) -> float:
        return self.mean_rate * (1 + self.amplitude) * self.burst_multiplier


@dataclass(frozen=True)
class TraceChunk:
    """Consecutive requests as columns. Adapter ids are popularity ranks, -1 pads a row."""

    timestamp: np.ndarray  # float64 seconds from the trace's start, ascending, to the microsecond
    family: np.ndarray  # int index into TraceParams.base_models
    controlnets: np.ndarray  # int (n, max count), ranks ascending then -1
    loras: np.ndarray  # int (n, max count)

    def __len__(self) -> int:
        return len(self.timestamp)


def diurnal(params: TraceParams, t: np.ndarray) -> np.ndarray:
    """The daily curve's factor at trace times `t` (mean 1 over a day)."""
    phase = t / params.day_s + (params.start_hour - params.peak_hour) / 24
    return 1 + params.amplitude * np.cos(2 * np.pi * phase)


def burst_windows(params: TraceParams, seed: int) -> list[tuple[float, float]]:
    """The trace's burst windows [start, end) in seconds, as `generate` places them."""
    rng = _rngs(seed)["bursts"]
    if params.bursts_per_day <= 0:
        return []
    n = math.ceil(params.bursts_per_day * params.duration_s / params.day_s)
    span = max(params.duration_s - params.burst_s, 0.0)
    starts = np.sort(rng.uniform(0, span, n))
    return [(float(s), float(s) + params.burst_s) for s in starts]


def rate(params: TraceParams, t: np.ndarray, windows: list[tuple[float, float]]) -> np.ndarray:
    """The arrival rate (requests/s) at trace times `t`."""
    lam = params.mean_rate * diurnal(params, t)
    in_burst = np.zeros(len(t), dtype=bool)
    for start, end in windows:
        in_burst |= (t >= start) & (t < end)
    return np.where(in_burst, lam * params.burst_multiplier, lam)


def mix_by_hour(params: TraceParams, seed: int) -> np.ndarray:
    """Base-model probabilities for each trace hour, shape (hours, families): the drifting mix."""
    rng = _rngs(seed)["drift"]
    n_hours = math.ceil(params.hours) + 1
    ranks = np.arange(1, len(params.base_models) + 1, dtype=float)
    log_w = -params.base_zipf_s * np.log(ranks)
    x = np.zeros((n_hours, len(ranks)))
    steps = rng.standard_normal((n_hours, len(ranks))) * params.drift_sigma
    for h in range(1, n_hours):
        x[h] = (1 - params.drift_revert) * x[h - 1] + steps[h]
    w = np.exp(log_w + x)
    return w / w.sum(axis=1, keepdims=True)


def chunks(params: TraceParams, seed: int) -> Iterator[TraceChunk]:
    """The trace as columnar chunks, in time order."""
    rngs = _rngs(seed)
    arrivals, content = rngs["arrivals"], rngs["content"]
    windows = burst_windows(params, seed)
    mix_cdf = np.cumsum(mix_by_hour(params, seed), axis=1)
    cn_cdf = _zipf_cdf(params.controlnets, params.controlnet_zipf_s)
    lora_cdf = _zipf_cdf(params.loras, params.lora_zipf_s)
    lam_max = params.max_rate
    window_s = CHUNK_REQUESTS / lam_max
    end = params.duration_s
    t0 = 0.0
    while t0 < end:
        n = arrivals.poisson(lam_max * window_s)
        t = t0 + np.sort(arrivals.random(n)) * window_s
        keep = arrivals.random(n) * lam_max < rate(params, t, windows)
        # Microseconds, as the JSONL keeps them: a chunk and its file then hold the same times.
        t = np.round(t[keep & (t < end)], 6)
        t0 += window_s
        if len(t) == 0:
            continue
        hour = np.minimum((t / params.hour_s).astype(np.int64), len(mix_cdf) - 1)
        family = (content.random(len(t))[:, None] > mix_cdf[hour]).sum(axis=1)
        family = np.minimum(family, len(params.base_models) - 1)
        cns = _adapters(content, len(t), params.p_controlnet, params.controlnet_counts, cn_cdf)
        loras = _adapters(content, len(t), params.p_lora, params.lora_counts, lora_cdf)
        yield TraceChunk(t, family, cns, loras)


class _Names:
    """Pre-formatted JSON fragments of the adapter names and workflows: a line is then a join."""

    def __init__(self, params: TraceParams) -> None:
        self.params = params
        self.cn_width = len(str(params.controlnets - 1))
        self.lora_width = len(str(params.loras - 1))

    @cached_property
    def families(self) -> list[str]:
        return list(self.params.base_models)

    @cached_property
    def cn(self) -> list[list[str]]:
        w = self.cn_width
        return [[f"{f}/cn-{i:0{w}d}" for i in range(self.params.controlnets)] for f in self.families]

    @cached_property
    def lora(self) -> list[list[str]]:
        w = self.lora_width
        return [[f"{f}/lora-{i:0{w}d}" for i in range(self.params.loras)] for f in self.families]

    @cached_property
    def workflow(self) -> list[list[list[str]]]:
        return [[[workflow_of(f, bool(c), bool(lo)) for lo in (0, 1)] for c in (0, 1)] for f in self.families]


def generate(params: TraceParams, seed: int) -> Iterator[TraceRequest]:
    """The trace as TraceRequests, in time order (streams: nothing is held but a chunk)."""
    names = _Names(params)
    for chunk in chunks(params, seed):
        for t, f, cn_row, lora_row in zip(
            chunk.timestamp.tolist(),
            chunk.family.tolist(),
            chunk.controlnets.tolist(),
            chunk.loras.tolist(),
            strict=True,
        ):
            cns = tuple(names.cn[f][i] for i in cn_row if i >= 0)
            loras = tuple(names.lora[f][i] for i in lora_row if i >= 0)
            workflow = names.workflow[f][bool(cns)][bool(loras)]
            yield TraceRequest(t, names.families[f], cns, loras, workflow)


def lines(params: TraceParams, seed: int) -> Iterator[str]:
    """The trace's JSONL lines (no newline), byte-identical to `TraceRequest.to_json` of `generate`."""
    names = _Names(params)
    quoted_cn = [[f'"{n}"' for n in fam] for fam in names.cn]
    quoted_lora = [[f'"{n}"' for n in fam] for fam in names.lora]
    heads = [f'"base_model":"{f}","controlnets":[' for f in names.families]
    tails = [[[f'],"workflow":"{w}"}}' for w in row] for row in fam] for fam in names.workflow]
    for chunk in chunks(params, seed):
        for t, f, cn_row, lora_row in zip(
            chunk.timestamp.tolist(),
            chunk.family.tolist(),
            chunk.controlnets.tolist(),
            chunk.loras.tolist(),
            strict=True,
        ):
            cn_q, lora_q = quoted_cn[f], quoted_lora[f]
            cns = ",".join([cn_q[i] for i in cn_row if i >= 0])
            loras = ",".join([lora_q[i] for i in lora_row if i >= 0])
            tail = tails[f][bool(cns)][bool(loras)]
            yield f'{{"timestamp":{round(t, 6)!r},{heads[f]}{cns}],"loras":[{loras}{tail}'


def write_trace(path: str | Path, params: TraceParams, seed: int) -> int:
    """Write the trace as JSONL; returns how many requests."""
    n = 0
    with open(path, "w") as f:
        batch: list[str] = []
        for line in lines(params, seed):
            batch.append(line)
            if len(batch) >= 8192:
                f.write("\n".join(batch) + "\n")
                n += len(batch)
                batch.clear()
        if batch:
            f.write("\n".join(batch) + "\n")
            n += len(batch)
    return n


def _rngs(seed: int) -> dict[str, np.random.Generator]:
    """Independent streams per concern: moving the bursts does not reshuffle the arrivals."""
    names = ("arrivals", "content", "drift", "bursts")
    children = np.random.SeedSequence(seed).spawn(len(names))
    return {name: np.random.Generator(np.random.PCG64(child)) for name, child in zip(names, children, strict=True)}


def _zipf_cdf(n: int, s: float) -> np.ndarray:
    w = np.arange(1, n + 1, dtype=float) ** -s
    cdf = np.cumsum(w)
    return cdf / cdf[-1]


def _adapters(rng: np.random.Generator, n: int, p_any: float, counts: tuple[float, ...], cdf: np.ndarray) -> np.ndarray:
    """Per request: none with probability 1 - p_any, else k distinct Zipf ranks (k ~ counts)."""
    k_max = len(counts)
    uses = rng.random(n) < p_any
    k = np.where(uses, 1 + rng.choice(k_max, size=n, p=list(counts)), 0)
    used = np.arange(k_max)[None, :] < k[:, None]
    size = len(cdf)
    # Unused slots hold distinct sentinels (>= size) so they never look like duplicates.
    pad = size + np.arange(k_max)[None, :]
    ids = np.where(used, np.searchsorted(cdf, rng.random((n, k_max)), side="right"), pad)
    ids = np.minimum(ids, np.where(used, size - 1, pad))
    ids.sort(axis=1)
    dup = (ids[:, 1:] == ids[:, :-1]).any(axis=1) if k_max > 1 else np.zeros(n, dtype=bool)
    while dup.any():  # redraw rows with a repeated adapter; converges geometrically
        rows = np.flatnonzero(dup)
        fresh = np.searchsorted(cdf, rng.random((len(rows), k_max)), side="right")
        fresh = np.where(used[rows], np.minimum(fresh, size - 1), pad)
        fresh.sort(axis=1)
        ids[rows] = fresh
        dup[rows] = (fresh[:, 1:] == fresh[:, :-1]).any(axis=1)
    return np.where(ids >= size, -1, ids)
