"""Forming a group and serving a follower: what every rank does at start, and a follower's loop.

Why every rank runs the same `join_group`: `torch.distributed` needs every rank to create
every process group in the same order, and a split request is the unsplit one only if every
rank holds the same weights, which they check here together before serving anything.
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

    rank: int
    world: int
    device: torch.device
    bundle: Any  # DenoiserBundle
    worker: Device
    loras: Any  # LoraCache: this rank's adapters on its network
    pair_groups: dict[int, Any]  # follower rank -> the (0, rank) group commands and results travel on


def rank_device(device: str, rank: int) -> str:
    """Rank r's device: the r-th GPU after the configured one, or the CPU."""
    if not device.startswith("cuda"):
        return "cpu"
    first = int(device.split(":")[1]) if ":" in device else 0
    return f"cuda:{first + rank}"


def _backend(device: str) -> str:
    return "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"


def join_group(settings: Settings, model_id: str, rank: int, world: int, init: str, bundle: Any = None) -> RankState:
    """Join the group as `rank`: process groups, the model on this rank's device (the leader
    passes the bundle it loaded), LoRAs, sequence parallelism, and the weights check."""
    from services.denoiser.lora import LoraCache
    from shared.zoo import load_denoiser, lora_path

    here = rank_device(settings.device, rank)
    if here.startswith("cuda"):
        torch.cuda.set_device(torch.device(here))
    dist.init_process_group(_backend(here), init_method=init, rank=rank, world_size=world, timeout=GROUP_TIMEOUT)
    pair_groups = {r: dist.new_group([0, r], timeout=GROUP_TIMEOUT) for r in range(1, world)}
    shard_groups = {
        (first, size): dist.new_group(list(range(first, first + size)), timeout=GROUP_TIMEOUT)
        for first, size in block_groups(world)
    }
    if bundle is None:
        bundle = load_denoiser(model_id, dataclasses.replace(settings, device=here))
    loras = LoraCache(bundle.transformer, max_bytes=int(settings.lora_cache_mb * 2**20))
    worker = Device(
        rank,
        bundle.transformer,
        activate_loras=lambda chosen: loras.activate_now(chosen, lambda name: lora_path(name, settings)),
        shard_groups=shard_groups,
    )
    digests = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(digests, torch.tensor([weights_digest(bundle.transformer)], dtype=torch.int64))
    if len({int(d.item()) for d in digests}) != 1:
        raise RuntimeError(
            f"the devices of {model_id}'s group hold different weights ({[int(d) for d in digests]}): "
            "every rank must load the same model files"
        )
    return RankState(rank, world, torch.device(here), bundle, worker, loras, pair_groups)


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


def serve_follower(state: RankState) -> None:
    """Run the leader's commands in order until it says stop (or its connection breaks)."""
    group = state.pair_groups[state.rank]
    log.info("group follower %d of %d ready on %s", state.rank, state.world, state.device)
    while True:
        message = wire.recv(0, group, state.device)
        if message.get("op") == "stop":
            break
        try:
            part, loras = message_part(message)
            out = state.worker.run(part, loras)
            reply: dict[str, Any] = {"op": "done", "output": out}
        except Exception as exc:  # this part only; the leader fails the request's step
            log.warning("group follower %d: a part failed: %s", state.rank, exc)
            reply = {"op": "error", "message": f"{type(exc).__name__}: {exc}"}
        wire.send(reply, 0, group, state.device)
    dist.destroy_process_group()
