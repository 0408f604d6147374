"""Forming a group and serving a follower: what every rank does at start, and a follower's loop.

Why every rank runs the same `join_group`: `torch.distributed` needs every rank to create
every process group in the same order, and a split request is the unsplit one only if every
rank holds the same weights, which they check here together before serving anything.

Ranks and devices: process rank 0 is the leader. On GPUs it also runs device 0 (its CUDA
kernels run asynchronously, so its Python threads stay free to coordinate), and device i is
rank i. On a CPU the leader only coordinates (`offset` 1): a device there is a core running
Python-heavy model code, and in the leader's process that code would fight its coordination
(every request's loop, every other device's traffic) for the GIL: measured on tiny Flux, a
device-0 step in the leader took 12-13 ms of CPU beside a busy device 1, against 7.7 ms
alone, and the second device added nothing. So device i is rank i + offset.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from services.denoiser.group import wire
from services.denoiser.group.device import Device, block_groups, weights_digest
from services.denoiser.group.split import Part
from services.denoiser.loop import TransformerCall
from shared.settings import Settings

log = logging.getLogger("lego.denoiser.group")

# How long a collective may wait for the other ranks: long enough for a full-size step on a
# busy device, short enough that a group whose member died stops rather than hangs.
GROUP_TIMEOUT = timedelta(seconds=300)


@dataclasses.dataclass
class RankState:
    """One rank's share of a group: its device, model and the process groups it talks over."""

    rank: int  # process rank (0: the leader)
    world: int  # devices in the group
    device_index: int  # the device this rank runs (the leader's: 0, run or not)
    device: torch.device
    bundle: Any  # DenoiserBundle
    worker: Device
    loras: Any  # LoraCache: this rank's adapters on its network
    offset: int = 0  # 1 when the leader runs no device: device i is then rank i + 1


def leader_runs_a_device(device: str) -> bool:
    """Whether the leader process runs device 0 itself (GPUs) or only coordinates (a CPU)."""
    return device.startswith("cuda")


def rank_device(device: str, index: int) -> str:
    """Device `index` of a group: the index-th GPU after the configured one, or the CPU."""
    if not device.startswith("cuda"):
        return "cpu"
    first = int(device.split(":")[1]) if ":" in device else 0
    return f"cuda:{first + index}"


def _backend(device: str) -> str:
    return "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"


def join_group(
    settings: Settings, model_id: str, rank: int, world: int, init: str, bundle: Any = None, offset: int = 0
) -> RankState:
    """Join the group of `world` devices as process `rank`: process groups, the model on this
    rank's device (the leader passes the bundle it loaded), LoRAs, sequence parallelism, and the
    weights check. `offset`: 1 when the leader runs no device (see the module)."""
    from services.denoiser.lora import LoraCache
    from shared.zoo import load_denoiser, lora_path

    if offset not in (0, 1) or (offset and leader_runs_a_device(settings.device)):
        raise ValueError(f"group offset {offset}: 0, or 1 on a CPU (a GPU leader runs device 0)")
    processes = world + offset
    index = max(rank - offset, 0)
    here = rank_device(settings.device, index)
    if here.startswith("cuda"):
        torch.cuda.set_device(torch.device(here))
    dist.init_process_group(_backend(here), init_method=init, rank=rank, world_size=processes, timeout=GROUP_TIMEOUT)
    shard_groups = {
        (first, size): dist.new_group([offset + d for d in range(first, first + size)], timeout=GROUP_TIMEOUT)
        for first, size in block_groups(world)
    }
    if bundle is None:
        bundle = load_denoiser(model_id, dataclasses.replace(settings, device=here))
    loras = LoraCache(
        bundle.transformer, int(settings.lora_cache_mb * 2**20), max_adapters=settings.lora_cache_max_adapters
    )
    worker = Device(
        index,
        bundle.transformer,
        activate_loras=lambda chosen: loras.activate_now(chosen, lambda name: lora_path(name, settings)),
        shard_groups=shard_groups,
    )
    digests = [torch.zeros(1, dtype=torch.int64) for _ in range(processes)]
    dist.all_gather(digests, torch.tensor([weights_digest(bundle.transformer)], dtype=torch.int64))
    if len({int(d.item()) for d in digests}) != 1:
        raise RuntimeError(
            f"the devices of {model_id}'s group hold different weights ({[int(d) for d in digests]}): "
            "every rank must load the same model files"
        )
    return RankState(rank, world, index, torch.device(here), bundle, worker, loras, offset)


def part_message(part: Part, loras: tuple[tuple[str, float], ...]) -> dict[str, Any]:
    call = part.call
    return {
        "op": "run",
        "loras": [[name, scale] for name, scale in loras],
        "batched": call.batched,
        "shared": call.shared,
        "cache_context": call.cache_context,
        "index": part.index,
        "shards": part.shards,
        "text_len": part.text_len,
    }


def message_part(message: dict[str, Any]) -> tuple[Part, tuple[tuple[str, float], ...]]:
    call = TransformerCall(batched=message["batched"], shared=message["shared"], cache_context=message["cache_context"])
    loras = tuple((str(name), float(scale)) for name, scale in message["loras"])
    part = Part(call=call, index=message["index"], shards=message["shards"], text_len=message["text_len"])
    return part, loras


def serve_follower(state: RankState, channel: wire.Channel) -> None:
    """Run the leader's commands from `channel` in order until it says stop (or the channel
    breaks): parts of calls here, in the order sent (their collectives meet in that order on
    every rank); whole loops handed over (`hosted`) on their own engine, answered as they end."""
    from services.denoiser.group.hosted import HostedLoops

    log.info(
        "group follower %d (device %d of %d) ready on %s", state.rank, state.device_index, state.world, state.device
    )
    hosted = HostedLoops(state.bundle, lambda call, loras: _whole(state, call, loras), channel.send)
    try:
        told_to_stop = _serve(state, channel, hosted)
    finally:
        hosted.close()
    if told_to_stop:
        dist.destroy_process_group()


def _whole(state: RankState, call: TransformerCall, loras: tuple[tuple[str, float], ...]) -> torch.Tensor:
    out = state.worker.run(Part(call=call), loras)
    assert out is not None  # an unsplit part always answers
    return out


def _serve(state: RankState, channel: wire.Channel, hosted: Any) -> bool:
    """Serve until told to stop (True) or until the leader is gone (False)."""
    while True:
        try:
            message = channel.recv(state.device)
        except ConnectionError:  # the leader died: its replica is gone, and this follower with it
            log.warning("group follower %d: the leader is gone; stopping", state.rank)
            return False
        op = message.get("op")
        if op == "stop":
            return True
        if op == "host":
            hosted.start(message)
            continue
        if op == "cancel":
            hosted.cancel(int(message["id"]))
            continue
        try:
            part, loras = message_part(message)
            out = state.worker.run(part, loras)
            reply: dict[str, Any] = {"op": "done", "output": out}
        except Exception as exc:  # this part only; the leader fails the request's step
            log.warning("group follower %d: a part failed: %s", state.rank, exc)
            reply = {"op": "error", "message": f"{type(exc).__name__}: {exc}"}
        try:
            channel.send(reply)
        except OSError:
            log.warning("group follower %d: the leader is gone; stopping", state.rank)
            return False
