"""Replicas that do nothing, on the mesh's real step path: what the control plane pays per step.

Each replica is a `shared.worker.StepWorker` on a `shared.bus.Bus` connection of its own, as a
model replica's is: it pulls the model's priority bands (`shared.priority_pull`), parses the
step, publishes its result on the result stream (deduplicated by Nats-Msg-Id) and acks it. Only
the model is missing: the handler answers at once with one tensor reference, the shape of a
denoiser's answer. The steps it is sent are the size of a real SD3 denoise step (typed params,
five input references), so parsing and encoding cost what they do in the mesh.

    python -m bench.noop_steps --nats-url nats://127.0.0.1:4222 --model noop-4 --replicas 4

runs 4 such replicas in this process (each its own connection and consume loop) until SIGTERM.
`bench/control_plane.py` starts these processes and drives them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared import nats_handoff, subjects
from shared.bus import Bus
from shared.lifecycle import run_until_stopped, stop_on_signals
from shared.logs import setup_logging
from shared.messages import DenoiseParams, StepKind, StepRequest, StepResult, TensorRef
from shared.settings import Settings
from shared.worker import StepWorker

log = logging.getLogger("lego.bench.noop")
KIND = StepKind.DENOISE
# An SD3 request's denoise inputs: the encoders' outputs, held by their producers (refs, not bytes).
INPUTS = {
    "clip_l_embeds": [2, 77, 768],
    "clip_l_pooled": [2, 768],
    "clip_g_embeds": [2, 77, 1280],
    "clip_g_pooled": [2, 1280],
    "t5_embeds": [2, 256, 4096],
}
PARAMS = DenoiseParams(height=1024, width=1024, num_inference_steps=28, guidance_scale=7.0, seed=1234)


def _ref(key: str, shape: list[int], dtype: str = "bfloat16") -> TensorRef:
    nbytes = 2
    for d in shape:
        nbytes *= d
    return TensorRef(
        key=key,
        dtype=dtype,
        shape=shape,
        nbytes=nbytes,
        token="0123456789abcdef0123456789abcdef",
        uri="tcp://10.0.0.17:40123",
        host="node-17",
    )


def noop_step(request_id: str, model_id: str, reply_to: str, deadline_s: float = 300.0) -> StepRequest:
    """One denoise step of a request, as the gateway publishes it (params, five input refs)."""
    return StepRequest(
        request_id=request_id,
        node_id="denoise",
        kind=KIND,
        model_id=model_id,
        params=PARAMS,
        inputs={name: _ref(f"{request_id}-{name}", shape) for name, shape in INPUTS.items()},
        reply_to=reply_to,
        progress_to=reply_to.replace("result", "progress"),
        deadline=time.time() + deadline_s,
    )


class NoopHandler:
    """Answers every step at once with the reference to one latents tensor (a denoiser's answer)."""

    def __init__(self, replica_id: str) -> None:
        self.replica_id = replica_id

    async def __call__(self, step: StepRequest) -> StepResult:
        return StepResult(
            request_id=step.request_id,
            node_id=step.node_id,
            attempt=step.attempt,
            ok=True,
            outputs={"latents": _ref(f"{step.request_id}-latents", [1, 16, 128, 128])},
            replica_id=self.replica_id,
        )


async def serve(settings: Settings, model_id: str, replicas: int) -> None:
    """`replicas` no-op replicas of `model_id`, each on its own connection, until SIGTERM."""
    stop = stop_on_signals()
    buses, tasks = [], []
    for i in range(replicas):
        replica_id = f"noop-{os.getpid()}-{i}"
        bus = Bus(settings, name=replica_id)
        await bus.connect()
        await bus.ensure_streams()
        buses.append(bus)
        worker = StepWorker(bus, KIND, model_id, NoopHandler(replica_id), replica_id)
        tasks.append(asyncio.create_task(worker.run(stop)))
    log.info("%d no-op replicas of %s consuming", replicas, model_id)
    await stop.wait()
    await asyncio.gather(*tasks, return_exceptions=True)
    for bus in buses:
        await bus.close()


ECHO_SUBJECT = "bench.echo"


async def echo(settings: Settings) -> None:
    """Answer every core-NATS request on ECHO_SUBJECT with its own payload, until SIGTERM: the
    floor under any hop between two Python processes through this nats-server on this box."""
    stop = stop_on_signals()
    bus = Bus(settings, name="echo")
    await bus.connect()

    async def answer(msg: Msg) -> None:
        await msg.respond(msg.data)

    await bus.nc.subscribe(ECHO_SUBJECT, cb=answer)
    await stop.wait()
    await bus.close()


async def js_echo(settings: Settings, model_id: str) -> None:
    """The least a JetStream step hop can cost: pull each message of `model_id`'s step consumer
    and publish its payload (a result subject) back through JetStream, then ack it, with no
    parsing, no priority bands, no metrics. `bench/hop.py`'s JetStream floor drives it."""
    stop = stop_on_signals()
    bus = Bus(settings, name="js-echo")
    await bus.connect()
    await bus.ensure_streams()
    durable = await bus.ensure_consumer(KIND, model_id)
    pull = f"$JS.API.CONSUMER.MSG.NEXT.{subjects.STEP_STREAM}.{durable}"
    arrived: asyncio.Queue[Msg] = asyncio.Queue()
    inbox = bus.nc.new_inbox()
    await nats_handoff.subscribe(bus.nc, inbox, arrived.put_nowait)
    n = 0
    while not stop.is_set():
        await bus.nc.publish(pull, b'{"batch":1,"expires":1000000000}', reply=inbox)
        msg = await arrived.get()
        if JetStreamContext.is_status_msg(msg):
            continue
        n += 1
        await bus.publish_acked(msg.data.decode(), b"ok", {"Nats-Msg-Id": f"js-echo-{os.getpid()}-{n}"})
        await msg.ack()
    await bus.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.noop_steps", description=__doc__.split("\n")[0])
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--model", default="noop", help="the model id whose steps these replicas take")
    parser.add_argument("--replicas", type=int, default=1, help="replicas in this process (default 1)")
    parser.add_argument("--echo", action="store_true", help="instead: echo core-NATS requests on " + ECHO_SUBJECT)
    parser.add_argument(
        "--js-echo", action="store_true", help="instead: echo the model's steps back through JetStream, bare"
    )
    args = parser.parse_args(argv)
    settings = Settings.from_env(nats_url=args.nats_url)
    setup_logging("noop", "WARNING")
    if args.js_echo:
        run_until_stopped(js_echo(settings, args.model), log)
    else:
        run_until_stopped(echo(settings) if args.echo else serve(settings, args.model, args.replicas), log)


if __name__ == "__main__":
    main()
