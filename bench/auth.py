"""What API keys cost a request: the same sd3 request through two gateways of one mesh, one
with keys on (a Bearer key with its rate and in-flight limits checked) and one with keys off
(`--no-auth`), interleaved one request at a time so both see the same machine state.

Both gateways share the nats-server and the model services, so the only difference between the
two columns is the gateway's key check (hash, lookup, limits, ownership). The order within each
pair alternates (on-off, off-on) so that neither side always runs second. The check itself is
also timed in process (no HTTP, no models) to show its cost apart from the run's noise.

Prints the table, then as the last line: `auth on vs off: R (+P%)`, R = median latency with
keys on / median with keys off. Raw figures go to bench/results/auth.json.

    python bench/auth.py [--runs 40] [--warmup 4] [--size 256] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lego.launcher import Mesh, MeshConfig, free_port  # noqa: E402

PROMPT = "a lighthouse on a cliff at dawn, oil painting"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=40, help="timed requests per gateway")
    p.add_argument("--warmup", type=int, default=4, help="untimed requests per gateway first")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--steps", type=int, default=8, help="denoising steps per request")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where auth.json goes")
    p.add_argument("--ready-timeout", type=float, default=600)
    return p.parse_args()


def open_gateway(mesh: Mesh) -> str:
    """A second gateway on the mesh's bus with keys off: the same services answer both."""
    port = free_port()
    child = mesh.add_gateway("gateway-open", port, auth=False)
    url = f"http://127.0.0.1:{port}"
    give_up = time.monotonic() + 120
    while time.monotonic() < give_up:
        if not child.alive():
            raise RuntimeError("the open gateway exited; see gateway-open.log")
        try:
            if httpx.get(f"{url}/readyz", params={"workflow": "sd3"}, timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the open gateway did not become ready")


def make_user_key(url: str, admin_key: str) -> str:
    """A plain tenant's key (scope generate), with limits high enough never to refuse this run:
    the limits are still checked on every request."""
    r = httpx.post(
        f"{url}/v1/keys",
        json={"name": "bench-user", "rate_per_min": 100000, "max_in_flight": 100},
        headers={"Authorization": f"Bearer {admin_key}"},
        timeout=30,
    )
    r.raise_for_status()
    return r.json()["key"]


def check_cost_us(rounds: int = 20000) -> float:
    """Microseconds of the key check alone (hash + lookup + scope), in process."""
    from services.gateway.keys.model import KeyRecord, Scope
    from services.gateway.keys.secret import hash_key, new_key

    key = new_key()
    index = {hash_key(new_key()): None for _ in range(1000)}
    record = KeyRecord(key_id="k", name="bench", hash=hash_key(key))
    index[record.hash] = record  # type: ignore[assignment]
    t0 = time.perf_counter()
    for _ in range(rounds):
        found = index.get(hash_key(key))
        assert found is not None and found.allows(Scope.GENERATE)
    return (time.perf_counter() - t0) / rounds * 1e6


def timed(client: httpx.Client, url: str, headers: dict[str, str], body: dict) -> float:
    t0 = time.perf_counter()
    r = client.post(f"{url}/v1/images/generations", json=body, headers=headers)
    elapsed = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"{url}: {r.status_code} {r.text[:300]}")
    return elapsed


def main() -> int:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state, log_dir = Path(tempfile.mkdtemp(prefix="bench-auth-state-")), out / "auth-logs"
    log_dir.mkdir(exist_ok=True)
    print("starting the mesh (nats-server, encoder, denoiser, vae, a locked and an open gateway) ...", flush=True)
    config = MeshConfig(port=free_port(), quiet=True, log_dir=log_dir, workflows=["sd3"], auth=True)
    config.env["LEGO_STATE_DIR"] = str(state)  # its own admin key, not the user's
    mesh = Mesh(config)
    mesh.start(ready_timeout_s=args.ready_timeout)
    on: list[float] = []
    off: list[float] = []
    try:
        open_url = open_gateway(mesh)
        assert mesh.admin_key_file is not None
        user = make_user_key(mesh.url, mesh.admin_key_file.read_text().strip())
        sides = {"on": (mesh.url, {"Authorization": f"Bearer {user}"}, on), "off": (open_url, {}, off)}
        size = f"{args.size}x{args.size}"
        with httpx.Client(timeout=600) as client:
            for i in range(args.warmup + args.runs):
                body = {"prompt": PROMPT, "size": size, "num_inference_steps": args.steps, "seed": i}
                order = ("on", "off") if i % 2 == 0 else ("off", "on")
                for side in order:
                    url, headers, times = sides[side]
                    t = timed(client, url, headers, body)
                    if i >= args.warmup:
                        times.append(t)
    finally:
        mesh.stop()

    check_us = check_cost_us()
    med_on, med_off = statistics.median(on), statistics.median(off)
    ratio = med_on / med_off
    q_on, q_off = statistics.quantiles(on, n=4), statistics.quantiles(off, n=4)
    pairs = [a - b for a, b in zip(on, off, strict=True)]
    print(f"\nsd3 {size}, {args.steps} steps, {args.runs} interleaved requests per gateway (one mesh, tiny models)")
    print(f"{'gateway':>10} {'median s':>9} {'p25 s':>8} {'p75 s':>8}")
    print(f"{'keys on':>10} {med_on:9.4f} {q_on[0]:8.4f} {q_on[2]:8.4f}")
    print(f"{'keys off':>10} {med_off:9.4f} {q_off[0]:8.4f} {q_off[2]:8.4f}")
    print(f"median of paired differences (on - off): {statistics.median(pairs) * 1000:+.2f} ms")
    print(f"the key check alone (hash + lookup + scope, in process): {check_us:.1f} us")
    (out / "auth.json").write_text(
        json.dumps(
            {"size": args.size, "steps": args.steps, "on_s": on, "off_s": off, "check_us": check_us, "ratio": ratio},
            indent=1,
        )
    )
    print(f"auth on vs off: {ratio:.3f} ({(ratio - 1) * 100:+.1f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
