"""Messages handed to our code straight from nats.py's read loop, one event-loop turn sooner.

Why: nats.py gives every subscription with a callback a task of its own. The read loop queues a
message; that task wakes on a later turn and calls the callback; a coroutine waiting on what the
callback sets wakes on a third. On the step path (a replica's pulls and every JetStream publish's
ack) those extra turns were a sixth of a no-op step's CPU (bench/control_plane.py). A handoff
subscription has no task: the read loop calls a plain function with the message.

This relies on two internals of nats-py (pinned in pyproject.toml): a subscription's
`_pending_queue`, which the read loop fills with `put_nowait`, and the request mux's
`_resp_map` of futures. Each use checks that they are there and otherwise takes nats.py's
public callback path, so a nats-py upgrade makes it slower, never wrong.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api
from nats.js.errors import APIError, NoStreamResponseError

log = logging.getLogger("lego.nats")

Deliver = Callable[[Msg], None]


class _Handoff(asyncio.Queue):  # type: ignore[type-arg]
    """Stands in for a subscription's pending queue: what the read loop puts is delivered at once."""

    def __init__(self, sub: Subscription, deliver: Deliver) -> None:
        super().__init__()
        self._sub = sub
        self._deliver = deliver

    def put_nowait(self, item: Msg) -> None:
        self._sub._pending_size -= len(item.data)  # the read loop counted it as pending
        try:
            self._deliver(item)
        except Exception:  # the read loop must go on: a bad handler loses its message only
            log.exception("handoff handler failed on %s", item.subject)


def _has_pending_queue(sub: Subscription) -> bool:
    return isinstance(getattr(sub, "_pending_queue", None), asyncio.Queue) and hasattr(sub, "_pending_size")


async def subscribe(nc: NATS, subject: str, deliver: Deliver) -> Subscription:
    """Subscribe `deliver` (a plain function, run in the read loop: it must not block) to `subject`."""
    sub = await nc.subscribe(subject)  # no callback: nats.py starts no task for it
    if _has_pending_queue(sub):
        sub._pending_queue = _Handoff(sub, deliver)
        return sub
    await sub.unsubscribe()

    async def callback(msg: Msg) -> None:
        deliver(msg)

    return await nc.subscribe(subject, cb=callback)


async def speed_up_requests(nc: NATS) -> bool:
    """Make `nc.request` (every JetStream publish and API call) resolve its reply in the read
    loop instead of in the request mux's task. Returns whether it could."""
    init = getattr(nc, "_init_request_sub", None)
    if init is None or not hasattr(nc, "_resp_map") or not hasattr(nc, "_inbox_prefix"):
        return False
    if not getattr(nc, "_resp_sub_prefix", None):
        await init()
    prefix = bytes(nc._resp_sub_prefix or b"").decode()
    mux = next((s for s in nc._subs.values() if s.subject == prefix + "*"), None)
    task = getattr(mux, "_wait_for_msgs_task", None)
    if mux is None or not _has_pending_queue(mux) or task is None:
        return False
    skip = len(nc._inbox_prefix) + 22 + 2  # the token after "<inbox prefix>.<22-char nuid>."; as nats.py reads it

    def resolve(msg: Msg) -> None:
        future = nc._resp_map.get(msg.subject[skip:])
        if future is not None and not future.done():
            future.set_result(msg)

    task.cancel()
    mux._wait_for_msgs_task = None
    mux._pending_queue = _Handoff(mux, resolve)
    return True


async def js_publish(nc: NATS, subject: str, payload: bytes, headers: dict[str, str], timeout_s: float) -> api.PubAck:
    """A JetStream publish and its ack, as `JetStreamContext.publish` makes it, one event-loop
    turn shorter: the reply is awaited directly (nats.py wraps it in `wait_for`, which wakes the
    caller a turn after the reply's future is set). The errors are nats.py's: NoStreamResponseError
    when no stream takes the subject, TimeoutError, APIError for the server's error answers.
    Needs `speed_up_requests` to have taken over the request mux (else: use `js.publish`)."""
    prefix = nc._resp_sub_prefix
    if not prefix:
        raise RuntimeError("js_publish needs speed_up_requests(nc) first")
    token = nc._nuid.next().decode()
    future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
    nc._resp_map[token] = future
    try:
        await nc.publish(subject, payload, reply=bytes(prefix).decode() + token, headers=headers)
        try:
            async with asyncio.timeout(timeout_s):
                msg = await future
        except TimeoutError:
            raise nats.errors.TimeoutError from None
    finally:
        nc._resp_map.pop(token, None)
    if msg.headers and msg.headers.get(api.Header.STATUS) == "503":  # no responders: no stream there
        raise NoStreamResponseError
    resp = json.loads(msg.data)
    if "error" in resp:
        raise APIError.from_error(resp["error"])
    return api.PubAck.from_response(resp)
