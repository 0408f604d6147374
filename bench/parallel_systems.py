"""The systems `bench/parallel.py` compares, and how it drives them.

* `Case`: one model at one shape (which denoiser, tiny or real width, size, steps, text tokens).
* `GroupSystem`: a denoiser group (`services.denoiser.group`): the leader in this process, its
  followers as processes, one `GroupEngine` whose mode (adaptive, never, always) is set per run.
* `Replicas`: the baseline, independent single-device denoisers in processes of their own, each
  running one request at a time (`run_loop`) from one shared queue, as competing consumers of
  one JetStream consumer do.
* `closed_loop`: C clients, each sending its next request when its last one came back.
* `measure_exchange`: the time of what a CFG or token split adds to a step on the wire: the
  leader sending a real part (its latents, text embeddings and the rest) to a peer process and
  getting its answer back, over the group's own message format (`group/wire.py`).

Why its own module: the replica and peer processes are started by `multiprocessing` (spawn),
which imports the functions they run by name; keeping them out of the script keeps that plain.
"""

from __future__ import annotations

import logging
import os
import queue
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.settings import Settings

READY_TIMEOUT_S = 600  # a replica loading a full-size model from a cold disk


@dataclass(frozen=True)
class Case:
    """One model at one shape. `layers`: None for the zoo's tiny model, 0 for the published
    depth, n > 0 for the published widths with every stack capped at n layers (`models_dir`
    then holds that model, `real_width_dir`)."""

    name: str
    model_id: str
    size: int
    steps: int
    text_len: int  # T5 tokens (SD3 adds CLIP's 77 in front)
    guidance: float
    layers: int | None = None
    models_dir: str = ""

    @property
    def family(self) -> str:
        from shared.zoo.families import FAMILIES

        return next(name for name, desc in FAMILIES.items() if desc.denoiser == self.model_id)


def real_width_dir(case: Case, settings: Settings) -> str:
    """A models directory holding `case`'s denoiser at the published widths (random weights,
    seeded), depth capped at `case.layers` (0: uncapped), in the settings' dtype; written once
    into the model cache. Only the transformer and its scheduler: the bench times the denoiser
    alone, so the text encoders and the VAE (which `write_full_size_sd3` also writes) are not
    needed."""
    import shutil

    from shared.zoo.dtypes import model_dtype
    from shared.zoo.full_size import build_full_size
    from shared.zoo.paths import family_dir
    from shared.zoo.tiny import build_once

    dtype = model_dtype(settings)
    depth = f"L{case.layers}" if case.layers else "full"
    name = f"bench-parallel-{case.model_id}-{depth}-{str(dtype).removeprefix('torch.')}"
    tiny_scheduler = family_dir(case.family, Settings(model_cache_dir=settings.model_cache_dir)) / "scheduler"

    def build(tmp: Path) -> None:
        meta = build_full_size(case.model_id)
        config = dict(meta.config)
        for key in ("num_layers", "num_single_layers"):
            if key in config and case.layers:
                config[key] = min(config[key], case.layers)
        torch.manual_seed(0)
        with torch.device(settings.device):
            model = type(meta).from_config(config).eval()
        model.to(dtype).save_pretrained(tmp / case.family / "transformer", safe_serialization=True)
        del model
        if settings.device.startswith("cuda"):
            torch.cuda.empty_cache()
        shutil.copytree(tiny_scheduler, tmp / case.family / "scheduler")

    info = {"name": name, "model": case.model_id, "layers": case.layers, "weights": "random"}
    return str(build_once(Path(settings.model_cache_dir) / name, build, info))


def request_inputs(bundle: Any, case: Case, seed: int) -> Any:
    """A request's denoising inputs: encoder outputs of the model's widths with `case.text_len`
    T5 tokens, random values from `seed` (the encoders are not what is measured)."""
    from services.denoiser.denoise import warm_up_inputs
    from services.denoiser.loop import DenoiseInputs

    gen = torch.Generator().manual_seed(seed)
    shapes = {k: tuple(v.shape) for k, v in warm_up_inputs(bundle).items()}
    shapes["t5_embeds"] = (2, case.text_len, shapes["t5_embeds"][-1])
    tensors = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    return DenoiseInputs(
        tensors,
        height=case.size,
        width=case.size,
        num_inference_steps=case.steps,
        guidance_scale=case.guidance,
        seed=seed,
    )


def run_alone(bundle: Any, case: Case, seed: int) -> torch.Tensor:
    """One request on this process's device, as a single-device denoiser runs it (`run_loop`)."""
    from services.denoiser.denoise import denoise_loop
    from services.denoiser.loop import run_loop

    return run_loop(bundle.transformer, denoise_loop(bundle, request_inputs(bundle, case, seed))).cpu()


class GroupSystem:
    """A group of `world` devices serving `case`'s model, the leader here (it holds `bundle`).
    `use(mode)` sets the degree rule for the requests submitted next (between runs only)."""

    def __init__(self, case: Case, settings: Settings, bundle: Any, world: int, max_batch: int) -> None:
        from services.denoiser.group.engine import GroupEngine
        from services.denoiser.group.executor import GroupExecutor

        self.case = case
        self.bundle = bundle
        self.degrees: list[int] = []
        self.trace: list[dict] = []  # per request: seed, degree, first device, submitted and done (s)
        self._t0 = time.perf_counter()
        executor = GroupExecutor(case.model_id, lambda: bundle, settings, world)
        self.engine = GroupEngine(executor, max_batch=max_batch, mode="never", on_degree=self.degrees.append)
        self._placed = _Placements()

    def use(self, mode: str) -> None:
        # GroupEngine reads its mode at each request's first step; switching it while no request
        # is in flight is what three engines over one executor would be, without three groups.
        self.engine.mode = mode
        self.degrees.clear()
        self.trace = []
        self._t0 = time.perf_counter()

    def submit(self, seed: int) -> Future[torch.Tensor]:
        from services.denoiser.denoise import denoise_loop
        from services.denoiser.group.engine import RequestFacts

        inputs = request_inputs(self.bundle, self.case, seed)
        loop = denoise_loop(self.bundle, inputs)
        label = f"seed {seed}"
        submitted = time.perf_counter() - self._t0
        done = self.engine.submit(loop, None, RequestFacts(label=label, steps=self.case.steps, inputs=inputs))
        degree, first = self._placed.pop(label)
        record = {"seed": seed, "degree": degree, "first_device": first, "submitted_s": round(submitted, 3)}
        self.trace.append(record)
        done.add_done_callback(lambda _f: record.update(done_s=round(time.perf_counter() - self._t0, 3)))
        return done

    def close(self) -> None:
        self.engine.close()
        logging.getLogger("lego.denoiser.group").removeHandler(self._placed)


class _Placements(logging.Handler):
    """Where the group's engine placed each request (its degree and first device), read from the
    line it logs for every request (`group/engine.py`): the bench's trace, without a hook in it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self._by_label: dict[str, tuple[int, int]] = {}
        engine_log = logging.getLogger("lego.denoiser.group")
        engine_log.setLevel(logging.INFO)
        engine_log.propagate = False  # its lines are read here, not printed
        engine_log.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("request %s: degree") and isinstance(record.args, tuple):
            label, degree, first = record.args[:3]
            self._by_label[str(label)] = (int(degree), int(first))

    def pop(self, label: str) -> tuple[int, int]:
        return self._by_label.pop(label, (0, -1))


def _replica_main(index: int, env: dict[str, str], case: Case, jobs: Any, results: Any) -> None:
    """A baseline replica: one process, one device, one request at a time, until told to stop
    (or until the bench that started it is gone)."""
    parent = os.getppid()
    os.environ.update(env)
    from services.denoiser.group.runtime import rank_device
    from shared.zoo import load_denoiser

    settings = Settings.from_env()
    torch.set_num_threads(max(settings.torch_threads, 1))
    bundle = load_denoiser(case.model_id, Settings.from_env(device=rank_device(settings.device, index)))
    run_alone(bundle, case, 0)  # warm-up, as the group's devices are warmed before they are timed
    results.put(("ready", index, None))
    while (job := _next_job(jobs, parent)) is not None:
        try:
            results.put((job, index, run_alone(bundle, case, job)))
        except Exception as exc:  # this request only
            results.put((job, index, f"{type(exc).__name__}: {exc}"))


def _next_job(jobs: Any, parent: int) -> int | None:
    """The next job, or None once told to stop or once the bench is gone: a bench killed
    mid-run (Ctrl-C twice, a timeout) must not leave its replicas behind."""
    while True:
        try:
            return jobs.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                return None


class Replicas:
    """`count` independent replicas (`_replica_main`) taking requests from one queue."""

    def __init__(self, case: Case, settings: Settings, count: int) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._jobs = ctx.Queue()
        self._results = ctx.Queue()
        self._pending: dict[int, Future[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.served: Counter[int] = Counter()  # requests per replica (since the last `use`)
        env = settings.to_env()
        self._procs = [
            ctx.Process(target=_replica_main, args=(i, env, case, self._jobs, self._results), daemon=True)
            for i in range(count)
        ]
        for p in self._procs:
            p.start()
        for _ in range(count):
            kind, _index, _ = self._results.get(timeout=READY_TIMEOUT_S)
            if kind != "ready":
                raise RuntimeError(f"a baseline replica answered {kind!r} before it was ready")
        self._collector = threading.Thread(target=self._collect, name="replica-results", daemon=True)
        self._collector.start()

    def use(self, _mode: str = "") -> None:
        self.served.clear()

    def submit(self, seed: int) -> Future[torch.Tensor]:
        done: Future[torch.Tensor] = Future()
        with self._lock:
            if seed in self._pending:
                raise ValueError(f"seed {seed} is already in flight")
            self._pending[seed] = done
        self._jobs.put(seed)
        return done

    def _collect(self) -> None:
        while True:
            try:
                seed, index, out = self._results.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in self._procs):
                    return
                continue
            except (EOFError, OSError):
                return
            with self._lock:
                done = self._pending.pop(seed)
            self.served[index] += 1
            if isinstance(out, str):
                done.set_exception(RuntimeError(f"replica {index}: {out}"))
            else:
                done.set_result(out)

    def close(self) -> None:
        for _ in self._procs:
            self._jobs.put(None)
        for p in self._procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()


def closed_loop(submit: Callable[[int], Future[torch.Tensor]], clients: int, per_client: int, seed0: int) -> dict:
    """`clients` clients sending `per_client` requests each, the next when the last came back;
    all start together.

    Throughput (`throughput_rps`) is the steady rate, without the ramp and the drain
    (`steady_rate`); the rate over the whole run (`makespan_rps`) is kept beside it. Why: with
    few requests a client, the drain, in which some clients have finished and their devices
    stand idle, weighs as much as the load itself, and two systems at the same steady rate
    differ there only by how their clients' answers happen to be staggered (a stagger of one
    request between 2 clients of 4 requests each costs a twelfth of the whole-run rate).
    """
    done_at: list[list[float]] = [[] for _ in range(clients)]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    start = threading.Event()

    def client(i: int) -> None:
        start.wait()
        try:
            for k in range(per_client):
                t0 = time.perf_counter()
                submit(seed0 + i * per_client + k).result(timeout=3600)
                t1 = time.perf_counter()
                latencies[i].append(t1 - t0)
                done_at[i].append(t1)
        except BaseException as exc:  # reported below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,), name=f"client-{i}") for i in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    start.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"a client's request failed: {errors[0]}") from errors[0]
    flat = [x for per in latencies for x in per]
    steady = steady_rate(done_at)
    return {
        "clients": clients,
        "requests": len(flat),
        "wall_s": wall,
        "makespan_rps": len(flat) / wall,
        "throughput_rps": steady if steady is not None else len(flat) / wall,
        "throughput_window": "steady" if steady is not None else "whole run (too few requests a client)",
        "latencies_s": flat,
        "done_at_s": [[t - t0 for t in times] for times in done_at],
    }


def steady_rate(done_at: list[list[float]]) -> float | None:
    """Answers per second between the C-th and the (N - C)-th answer of the run (N answers, C
    clients; `done_at`: each client's answer times): the first C are the ramp (every client's
    first request arriving at once, on average one answer each), the last C the drain (clients
    done, devices idle). Counted over all clients together, so a system that serves its clients
    unevenly is measured as fairly as one that serves them in turn. None when the run has no
    answers between them (fewer than 2C + 1)."""
    times = sorted(t for per in done_at for t in per)
    clients = len(done_at)
    if len(times) <= 2 * clients:
        return None
    begin, end = times[clients - 1], times[len(times) - clients - 1]
    if end <= begin:
        return None
    return (len(times) - 2 * clients) / (end - begin)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the nearest ranks."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# -- the exchange, alone ------------------------------------------------------------------------------


def _exchange_peer(sock: Any, device: str, threads: int) -> None:
    """The far end of `measure_exchange`: answer every message with the part's output (a tensor
    like its latents when its part answers, as a follower's does), until told to stop."""
    from services.denoiser.group.wire import Channel

    channel = Channel(sock)
    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    here = torch.device(device)
    while (message := channel.recv(here)).get("op") != "stop":
        latents = message["batched"]["hidden_states"]
        out = torch.zeros_like(latents) if message["index"] == 0 else None
        channel.send({"op": "done", "output": out})


def measure_exchange(case: Case, bundle: Any, device: str, peer_device: str, threads: int, rounds: int) -> dict:
    """Median seconds of one split step's traffic between the leader and one other device: its
    part of the request's first call (cut as the group cuts it) sent over the group's channel
    (`group/wire.py`), the answer back (the noise prediction of its rows for a CFG split; none
    for a token shard, whose exchange happens inside the model and is not counted here)."""
    import multiprocessing
    import socket

    from services.denoiser.denoise import denoise_loop
    from services.denoiser.group.runtime import part_message
    from services.denoiser.group.split import layout, split
    from services.denoiser.group.wire import Channel

    first = next(denoise_loop(bundle, request_inputs(bundle, case, 0)))
    # by_tokens=True: SD3 and Flux both split by tokens (`sequence.install`, which the group runs
    # on this model later; installing it twice would hook it twice); rows still come first.
    how = layout(2, first, by_tokens=True)
    if how is None:
        raise ValueError(f"{case.name}: the first call cannot be split over 2 devices")
    message = part_message(split(first, how)[1], ())
    mine, theirs = socket.socketpair()
    ctx = multiprocessing.get_context("spawn")
    peer = ctx.Process(target=_exchange_peer, args=(theirs, peer_device, threads))
    peer.start()
    theirs.close()
    channel = Channel(mine)
    here = torch.device(device)
    try:
        took = []
        for _ in range(rounds + 2):  # the first two warm the connection up
            t0 = time.perf_counter()
            channel.send(message)
            reply = channel.recv(here)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            took.append(time.perf_counter() - t0)
        channel.send({"op": "stop"})
    finally:
        peer.join(timeout=30)
        if peer.is_alive():
            peer.kill()
        channel.close()
    sent = sum(t.numel() * t.element_size() for t in tensors_of(message))
    back = sum(t.numel() * t.element_size() for t in tensors_of(reply))
    return {"median_s": statistics.median(took[2:]), "bytes_sent": sent, "bytes_back": back, "layout": how.__dict__}


def tensors_of(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_of(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in tensors_of(v)]
    return []


# -- the machine: others' work on a shared box -------------------------------------------------------


def _cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / tick, sum(fields[:8]) / tick


def _tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by `root` and every live process under it (this bench's workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry)] = int(rest[1])
        used[int(entry)] = (int(rest[11]) + int(rest[12])) / tick
    mine = {root}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parent.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                grew = True
    return sum(used.get(pid, 0.0) for pid in mine)


class Machine:
    """What else ran on this machine while a measurement did: `wait_quiet()` before it (others'
    CPU use below `quiet` of the machine for a second, or give up after `patience_s`), and
    `others()` after it: the share of the machine's CPU time others used meanwhile."""

    def __init__(self, quiet: float = 0.1, patience_s: float = 60.0) -> None:
        self.quiet = quiet
        self.patience_s = patience_s
        self._mark = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        busy, total = _cpu_seconds()
        return busy, total, _tree_cpu_seconds(os.getpid())

    def busy_share(self, window_s: float = 0.5) -> float:
        """Others' share of the machine's CPU over the next `window_s`."""
        self.mark()
        time.sleep(window_s)
        return self.others()

    def wait_quiet(self) -> float:
        """Seconds waited for others to leave the machine (at most `patience_s`)."""
        t0 = time.monotonic()
        while self.busy_share() > self.quiet and time.monotonic() - t0 < self.patience_s:
            time.sleep(2.0)
        self.mark()
        return time.monotonic() - t0

    def mark(self) -> None:
        self._mark = self._sample()

    def others(self) -> float:
        """Others' share of the machine's CPU time since `mark()` (0: only this bench ran)."""
        busy0, total0, mine0 = self._mark
        busy1, total1, mine1 = self._sample()
        if total1 <= total0:
            return 0.0
        return max(0.0, (busy1 - busy0) - (mine1 - mine0)) / (total1 - total0)
