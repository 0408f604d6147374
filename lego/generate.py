"""`lego generate`: one request through the gateway's REST API, followed over server-sent
events (with a progress bar), its images written to disk."""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
import uuid
from pathlib import Path

import httpx

from lego.keys import auth_headers, resolve_api_key

SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


class _Usage(ValueError):
    """Flags no request can be built from (exit status 2); the message says which."""


class _Refused(Exception):
    """The gateway refused or failed the request; the message says why."""


def cmd_generate(args: argparse.Namespace) -> int:
    request_id = uuid.uuid4().hex
    try:
        body = request_body(args)
    except _Usage as exc:
        print(f"lego generate: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    tty = sys.stderr.isatty()
    try:
        payload = _follow(args, body, request_id, show=tty or args.progress, tty=tty, started=started)
    except httpx.HTTPError as exc:
        print(f"lego generate: cannot reach the gateway at {args.url}: {exc} (is `lego up` running?)", file=sys.stderr)
        return 1
    except _Refused as exc:
        print(f"lego generate: {exc}", file=sys.stderr)
        return 1
    paths = _write_images(Path(args.output), payload["data"])
    print(
        f"wrote {', '.join(map(str, paths))}  (workflow {payload['workflow']}, seed {payload['seed']}, "
        f"{time.monotonic() - started:.2f}s)"
    )
    return 0


def request_body(args: argparse.Namespace) -> dict:
    """The POST /v1/images/generations body the flags ask for (async: the answer comes as events)."""
    body: dict = {"prompt": args.prompt, "size": args.size, "n": args.n, "guidance_scale": args.guidance}
    for key, value in (
        ("workflow", args.workflow),
        ("num_inference_steps", args.steps),
        ("seed", args.seed),
        ("negative_prompt", args.negative),
    ):
        if value is not None:
            body[key] = value
    body["output_format"] = fmt = _output_format(args.output)
    if args.quality is not None:
        if fmt == "png":
            raise _Usage("--quality applies to .jpg and .webp outputs; png is lossless")
        body["output_quality"] = args.quality
    if args.control_image:
        body["controlnet"] = {"image": _read_b64(args.control_image), "conditioning_scale": args.conditioning_scale}
    if args.lora:
        body["loras"] = [_lora(item) for item in args.lora]
    body["wait"] = False
    body["timeout_s"] = min(args.timeout, 3600)  # the gateway's deadline too: it refuses what cannot make it
    return body


def _output_format(output: str) -> str:
    fmt = SUFFIX_FORMATS.get(Path(output).suffix.lower())
    if fmt is None:
        raise _Usage(f"-o must end in {', '.join(SUFFIX_FORMATS)} (it picks the format)")
    return fmt


def _read_b64(path: str) -> str:
    try:
        return base64.b64encode(Path(path).read_bytes()).decode()
    except OSError as exc:
        raise _Usage(f"cannot read --control-image: {exc}") from exc


def _lora(item: str) -> dict:
    name, _, scale = item.partition(":")
    try:
        if not name:
            raise ValueError(item)
        return {"name": name, "scale": float(scale) if scale else 1.0}
    except ValueError:
        raise _Usage("--lora takes NAME or NAME:SCALE, e.g. sd3-lora-a:0.8") from None


def _write_images(out: Path, images: list[dict]) -> list[Path]:
    """One image to `out`; several to `out-1`, `out-2`, ... with the same suffix."""
    paths = (
        [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(len(images))]
    )
    for path, item in zip(paths, images, strict=True):
        path.write_bytes(base64.b64decode(item["b64_json"]))
    return paths


def _refusal(status: int, text: str) -> _Refused:
    try:
        err = json.loads(text).get("error", {})
        return _Refused(f"HTTP {status} {err.get('code')}: {err.get('message')}")
    except (ValueError, AttributeError):
        return _Refused(f"HTTP {status}: {text[:300]}")


def _follow(args: argparse.Namespace, body: dict, request_id: str, show: bool, tty: bool, started: float) -> dict:
    """Submit in async mode, then follow the request's server-sent events to its answer,
    drawing a progress bar from the `progress` events."""
    headers = auth_headers(resolve_api_key(args.api_key))
    with httpx.Client(timeout=httpx.Timeout(30, read=args.timeout), headers=headers) as client:
        r = client.post(f"{args.url}/v1/images/generations", json=body, headers={"X-Request-Id": request_id})
        if r.status_code == 200:  # answered at once
            return r.json()
        if r.status_code != 202:
            raise _refusal(r.status_code, r.text)
        shown = ""
        with client.stream("GET", f"{args.url}{r.json()['events_url']}") as events:
            kind = ""
            for line in events.iter_lines():
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                if not line.startswith("data: "):
                    continue
                event = json.loads(line.removeprefix("data: "))
                if kind == "result":
                    if tty and shown:
                        print(file=sys.stderr)
                    return event
                if kind == "error":
                    if tty and shown:
                        print(file=sys.stderr)
                    raise _Refused(f"{event.get('code')}: {event.get('message')}")
                stage = _event_stage(event)
                if show and stage and stage != shown:
                    shown = stage
                    line_out = f"{stage:<40} {time.monotonic() - started:5.1f}s"
                    print(f"\r{line_out}" if tty else line_out, end="" if tty else "\n", file=sys.stderr, flush=True)
    raise _Refused("the event stream ended before the result; see GET /v1/requests/" + request_id)


def _event_stage(event: dict) -> str:
    if event.get("type") == "progress":
        done, total = event["step"], event["total"]
        filled = int(24 * done / total) if total else 0
        return f"denoising [{'#' * filled}{'.' * (24 - filled)}] {done}/{total}"
    if event.get("type") == "node" and event.get("state") == "running":
        return f"running {event['node']}"
    if event.get("type") == "queued":
        return "queued"
    return ""
