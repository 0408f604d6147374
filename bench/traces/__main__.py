"""`python -m bench.traces`: generate a production-shaped trace, print a trace's figures, or
convert the published Katz trace to our JSONL.

    python -m bench.traces generate --hours 1 --rate 300 --seed 1 --out trace.jsonl
    python -m bench.traces generate --hours 24 --day-s 600 --rate 20 --out day.jsonl  # a day in 10 min
    python -m bench.traces stats trace.jsonl [--hour-s 25]
    python -m bench.traces katz diffusion_model_request_trace.json --service A --out katz-a.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields

from bench.traces.generate import TraceParams, burst_windows, write_trace
from bench.traces.katz import KatzFormatError, load_katz, popularity_map, to_families
from bench.traces.record import write_jsonl
from bench.traces.stats import format_stats, read_light, trace_stats

DEFAULTS = {f.name: f.default for f in fields(TraceParams)}

# flag -> (TraceParams field, help). The defaults and their sources are in TraceParams.
GENERATE_FLAGS: dict[str, tuple[str, str]] = {
    "--hours": ("hours", "trace length in trace hours (each day-s/24 seconds)"),
    "--rate": ("mean_rate", "mean requests/s over a day, bursts excluded"),
    "--day-s": ("day_s", "length of a day in trace seconds; e.g. 600 compresses a day into 10 min"),
    "--peak-to-trough": ("peak_to_trough", "diurnal peak/trough rate ratio"),
    "--peak-hour": ("peak_hour", "hour of day of the diurnal peak"),
    "--start-hour": ("start_hour", "hour of day the trace starts at"),
    "--bursts-per-day": ("bursts_per_day", "bursts a day (at least one in any trace when > 0; 0: none)"),
    "--burst-multiplier": ("burst_multiplier", "rate multiplier inside a burst"),
    "--burst-s": ("burst_s", "burst length in trace seconds"),
    "--base-zipf": ("base_zipf_s", "Zipf exponent of base-model popularity (sdxl, sd15, flux, sd3, sd35-large)"),
    "--drift-sigma": ("drift_sigma", "hourly random-walk step of the base-model log-weights"),
    "--drift-revert": ("drift_revert", "hourly pull of the mix back to its Zipf weights (0..1)"),
    "--p-controlnet": ("p_controlnet", "share of requests with >= 1 ControlNet (published: > 0.98)"),
    "--controlnets": ("controlnets", "ControlNets per base-model family (published: ~150)"),
    "--controlnet-zipf": ("controlnet_zipf_s", "Zipf exponent of ControlNet popularity"),
    "--p-lora": ("p_lora", "share of requests with >= 1 LoRA (published: > 0.95)"),
    "--loras": ("loras", "LoRAs per base-model family (published: ~14,500)"),
    "--lora-zipf": ("lora_zipf_s", "Zipf exponent of LoRA popularity"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.traces",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = p.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate",
        help="write a production-shaped trace (JSONL)",
        description="Write a seeded production-shaped trace; same flags and seed give the same bytes. "
        "What each default rests on: bench/traces/generate.py, TraceParams.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for flag, (name, text) in GENERATE_FLAGS.items():
        default = DEFAULTS[name]
        gen.add_argument(flag, dest=name, type=type(default), default=default, help=text)
    gen.add_argument("--seed", type=int, default=0, help="random seed")
    gen.add_argument("--out", required=True, help="output JSONL file")
    st = sub.add_parser(
        "stats",
        help="print a trace's figures",
        description="Print a JSONL trace's request count, mean rate, shares with ControlNets/LoRAs, "
        "top-10%% concentration, base-model and workflow mix, hourly peak/trough.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    st.add_argument("file", help="JSONL trace (bench/traces/record.py format)")
    st.add_argument("--hour-s", type=float, default=3600.0, help="hour length for the hourly rates (day-s/24)")
    kz = sub.add_parser(
        "katz",
        help="convert the published Katz trace to our JSONL",
        description="Read the Katz/SwiftDiffusion trace (diffusion_model_request_trace.json; see "
        "bench/traces/katz.py for the layout) and write it as our JSONL, timestamps from 0.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    kz.add_argument("file", help="the trace file (JSON array, JSON lines or CSV)")
    kz.add_argument("--out", required=True, help="output JSONL file")
    kz.add_argument("--service", choices=["A", "B"], default=None, help="keep one service (scene_id)")
    kz.add_argument(
        "--families",
        action="store_true",
        help="map the most used base-model ids onto our families (sdxl, sd15, flux, sd3, sd35-large) and set workflow",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "generate":
        try:
            params = TraceParams(**{name: getattr(args, name) for name, _ in GENERATE_FLAGS.values()})
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        start = time.perf_counter()
        try:
            n = write_trace(args.out, params, args.seed)
        except OSError as e:
            print(f"error: cannot write {args.out}: {e}", file=sys.stderr)
            return 2
        took = time.perf_counter() - start
        bursts = burst_windows(params, args.seed)
        print(f"wrote {n} requests over {params.duration_s:.0f} s to {args.out} in {took:.1f} s ({n / took:,.0f}/s)")
        print(f"bursts (x{params.burst_multiplier:g}): " + ", ".join(f"{s:.0f}-{e:.0f} s" for s, e in bursts))
        return 0
    if args.command == "stats":
        try:
            stats = trace_stats(read_light(args.file), hour_s=args.hour_s)
        except OSError as e:
            print(f"error: cannot read {args.file}: {e}", file=sys.stderr)
            return 2
        except (KeyError, TypeError, ValueError) as e:
            print(f"error: {args.file} is not a JSONL trace (bench/traces/record.py): {e!r}", file=sys.stderr)
            return 2
        print(format_stats(stats))
        return 0
    try:
        requests = load_katz(args.file, service=args.service)
    except (KatzFormatError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.families:
        requests = to_families(requests, popularity_map(requests))
    n = write_jsonl(args.out, requests)
    print(f"wrote {n} requests to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
