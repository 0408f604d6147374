"""How a parallel group cuts a call (rows first, then image tokens) and what crosses between its
devices (a JSON header and raw tensors, never a pickle). No processes here: the groups of real
processes are in tests/integration/test_parallel_split.py and tests/e2e/test_parallel_groups.py."""

from __future__ import annotations

import json
import logging
import queue
import threading

import pytest
import torch

from services.denoiser.group import wire
from services.denoiser.group.split import Layout, layout, merge, split, tokens
from services.denoiser.loop import TransformerCall
from tests.waiting import wait_for


def flux_call(rows: int, n_tokens: int = 16, residuals: bool = False) -> TransformerCall:
    return TransformerCall(
        batched={
            "hidden_states": torch.randn(rows, n_tokens, 8),
            "timestep": torch.rand(rows),
            "encoder_hidden_states": torch.randn(rows, 5, 8),
            "controlnet_block_samples": [torch.randn(rows, n_tokens, 8)] if residuals else None,
        },
        shared={"img_ids": torch.arange(n_tokens * 3.0).view(n_tokens, 3), "txt_ids": torch.zeros(5, 3)},
        cache_context="cond",
    )


def sd3_call(rows: int, side: int = 8) -> TransformerCall:
    return TransformerCall(
        batched={"hidden_states": torch.randn(rows, 4, side, side), "encoder_hidden_states": torch.randn(rows, 6, 8)},
        shared={"joint_attention_kwargs": None, "return_dict": False},
    )


def test_rows_first_then_tokens_and_only_where_they_divide() -> None:
    # CFG (2 rows): the halves over 2 devices; over 4, halves x 2 token shards.
    assert layout(2, sd3_call(2), by_tokens=True) == Layout(rows=2, shards=1)
    assert layout(4, sd3_call(2), by_tokens=True) == Layout(rows=2, shards=2)
    # Flux, one image, no CFG rows: tokens only.
    assert layout(2, flux_call(1), by_tokens=True) == Layout(rows=1, shards=2)
    assert layout(4, flux_call(1), by_tokens=True) == Layout(rows=1, shards=4)
    # A model that cannot split tokens (a UNet) takes only what its rows allow.
    assert layout(4, sd3_call(2), by_tokens=False) is None
    assert layout(2, flux_call(1), by_tokens=False) is None
    # Tokens that do not divide evenly are not split that way.
    assert layout(4, flux_call(1, n_tokens=18), by_tokens=True) is None
    assert tokens(sd3_call(1, side=8)) == 16  # 8x8 latents in 2x2 patches


def test_row_parts_merge_back_in_order() -> None:
    call = sd3_call(4)
    parts = split(call, Layout(rows=2, shards=1))
    assert [p.call.rows() for p in parts] == [2, 2]
    outs = [p.call.batched["hidden_states"] * 2 for p in parts]  # what each device would answer
    torch.testing.assert_close(merge(outs, Layout(rows=2, shards=1)), call.batched["hidden_states"] * 2)


def test_token_shards_cut_tokens_ids_and_residuals_and_only_the_first_answers() -> None:
    call = flux_call(1, n_tokens=16, residuals=True)
    parts = split(call, Layout(rows=1, shards=4))
    assert [p.index for p in parts] == [0, 1, 2, 3] and [p.answers for p in parts] == [True, False, False, False]
    for i, p in enumerate(parts):
        assert p.text_len == 5
        torch.testing.assert_close(p.call.batched["hidden_states"], call.batched["hidden_states"][:, 4 * i : 4 * i + 4])
        torch.testing.assert_close(p.call.shared["img_ids"], call.shared["img_ids"][4 * i : 4 * i + 4])
        torch.testing.assert_close(
            p.call.batched["controlnet_block_samples"][0],
            call.batched["controlnet_block_samples"][0][:, 4 * i : 4 * i + 4],
        )
        torch.testing.assert_close(p.call.batched["encoder_hidden_states"], call.batched["encoder_hidden_states"])
    with pytest.raises(RuntimeError, match="no output"):
        merge([None, None, None, None], Layout(rows=1, shards=4))


def test_a_message_is_json_and_raw_tensors_never_a_pickle() -> None:
    call = flux_call(2, residuals=True)
    message = {"op": "run", "batched": call.batched, "shared": call.shared, "loras": [["a", 0.5]], "n": None}
    tensors: list[torch.Tensor] = []
    spec = wire.flatten(message, tensors)
    header = json.dumps(spec)  # the header is plain JSON
    assert "pickle" not in header and all(isinstance(t, torch.Tensor) for t in tensors)
    rebuilt = wire.rebuild(json.loads(header), tensors)
    assert rebuilt["loras"] == [["a", 0.5]] and rebuilt["n"] is None
    torch.testing.assert_close(rebuilt["shared"]["img_ids"], call.shared["img_ids"])
    torch.testing.assert_close(
        rebuilt["batched"]["controlnet_block_samples"][0], call.batched["controlnet_block_samples"][0]
    )
    assert wire.tensor_specs(spec)[0][1:] == ("float32", [2, 16, 8])
    with pytest.raises(TypeError, match="cannot send a object"):
        wire.flatten({"x": object()}, [])
    with pytest.raises(TypeError, match="complex64"):
        wire.flatten({"x": torch.zeros(1, dtype=torch.complex64)}, [])


# -- the leader's scheduler: degrees and devices, over a stand-in for the devices ------------------


class _Devices:
    """What GroupEngine needs of an executor. Every call on a block starting at device `first` is
    recorded as (first, layout) in `started[first]` and then waits until the test lets one call
    there finish (`finish(first)`): the test decides the interleaving, no timing involved."""

    def __init__(self, world: int) -> None:
        self.world, self.by_tokens = world, True
        self.started: dict[int, queue.Queue[tuple[int, Layout]]] = {r: queue.Queue() for r in range(world)}
        self._gates = {r: threading.Semaphore(0) for r in range(world)}

    def run(self, first, call, how, loras):
        self.started[first].put((first, how))
        assert self._gates[first].acquire(timeout=30), "the test never let this call finish"
        return torch.zeros_like(call.batched["hidden_states"])

    def next_call(self, first: int) -> tuple[int, Layout]:
        """The next call run on a block starting at `first` (waits for it)."""
        return self.started[first].get(timeout=30)

    def finish(self, first: int, calls: int = 1) -> None:
        for _ in range(calls):
            self._gates[first].release()

    def close(self) -> None:
        pass


def _loop(call: TransformerCall, steps: int):
    for _ in range(steps):
        yield call
    return "done"


def _engine(world: int, **kw):
    from services.denoiser.group.engine import GroupEngine

    devices = _Devices(world)
    return devices, GroupEngine(devices, max_batch=kw.pop("max_batch", 1), mode="adaptive", **kw)  # type: ignore[arg-type]


CFG, CFG_X_TOKENS, ONE = Layout(rows=2, shards=1), Layout(rows=2, shards=2), Layout(rows=1, shards=1)


def test_a_lone_request_is_split_and_the_next_runs_beside_on_the_least_loaded_device() -> None:
    degrees: list[int] = []
    devices, engine = _engine(4, on_degree=degrees.append)
    try:
        first = engine.submit(_loop(sd3_call(2), 2))  # idle group: CFG halves x 2 token shards
        assert devices.next_call(0) == (0, CFG_X_TOKENS)
        second = engine.submit(_loop(sd3_call(2), 2))  # one request held: 4 // 2 = 2 devices
        assert devices.next_call(2) == (2, CFG)  # the first one shrinks to devices 0-1
        third = engine.submit(_loop(sd3_call(2), 2))  # two held: one device each, the least loaded
        assert devices.next_call(1) == (1, ONE)
        for rank in range(4):
            devices.finish(rank, 10)
        assert [f.result(timeout=30) for f in (first, second, third)] == ["done"] * 3
    finally:
        engine.close()
    assert degrees == [4, 2, 1]
    assert engine.step_s.keys() <= {1, 2, 4}
    with pytest.raises(ValueError, match="adaptive, never, always"):
        type(engine)(devices, max_batch=1, mode="sometimes")  # type: ignore[arg-type]


def test_a_split_request_shrinks_when_another_arrives_and_grows_back_when_it_leaves(caplog) -> None:
    devices, engine = _engine(2)
    caplog.set_level(logging.INFO, logger="lego.denoiser.group")
    try:
        alone = engine.submit(_loop(sd3_call(2), 5))
        assert devices.next_call(0) == (0, CFG)  # alone: the CFG halves on devices 0 and 1
        newcomer = engine.submit(_loop(sd3_call(2), 2))
        assert devices.next_call(1) == (1, ONE)  # the newcomer has device 1 to itself ...
        devices.finish(0)  # ... and the first request's call in flight ends on both devices
        assert devices.next_call(0) == (0, ONE)  # its next one runs on device 0 alone
        devices.finish(1, 2)
        assert devices.next_call(1) == (1, ONE)
        assert newcomer.result(timeout=30) == "done"
        devices.finish(0)  # the call that began on device 0 alone ends there
        for _ in range(3):  # the newcomer has left: the remaining calls are split again
            assert devices.next_call(0) == (0, CFG)
            devices.finish(0)
        assert alone.result(timeout=30) == "done"
    finally:
        engine.close()
    assert devices.started[0].empty() and devices.started[1].empty()
    assert engine.step_s == {}  # neither request had the group to itself from start to end: not timed
    moves = [r.getMessage() for r in caplog.records if r.getMessage().startswith("unit")]
    assert moves == [
        "unit 0-1: degree 2 -> 1 on devices 0-0 (shrink: 2 requests on 2 devices)",
        "unit 0-1: degree 1 -> 2 on devices 0-1 (grow: 1 request(s) on 2 devices)",
    ]


def test_a_request_counts_for_the_policy_only_if_it_had_the_group_to_itself() -> None:
    """The policy compares degrees by their measured step times, so every degree is timed the
    same way: a whole request, submission to latents, per step; and only a request that found
    the group idle and saw no other enter before it ended (another one's work on the same
    devices would be counted as this degree's cost, and keep later lone requests off it)."""
    devices, engine = _engine(2)
    try:
        first = engine.submit(_loop(sd3_call(2), 2))  # alone from start to end: timed, at degree 2
        assert devices.next_call(0) == (0, CFG)
        devices.finish(0)
        assert devices.next_call(0) == (0, CFG)
        devices.finish(0)
        assert first.result(timeout=30) == "done"
        wait_for("the first request's step time", lambda: 2 in engine.step_s, every_s=0.001)
        second = engine.submit(_loop(sd3_call(2), 2))  # alone at first; degree 1 not measured yet: tried
        assert devices.next_call(0) == (0, ONE)
        third = engine.submit(_loop(sd3_call(2), 1))  # enters while the second runs
        assert devices.next_call(1) == (1, ONE)
        devices.finish(0)
        devices.finish(1)
        assert devices.next_call(0) == (0, ONE)
        devices.finish(0)
        assert second.result(timeout=30) == third.result(timeout=30) == "done"
    finally:
        engine.close()
    assert set(engine.step_s) == {2}  # neither the second nor the third had the group to itself


def test_requests_that_come_back_together_are_not_split_for_being_first() -> None:
    """Requests that end together come back together: the first to arrive finds the group idle,
    but the group held two a moment ago (within its longest measured step), so it is not split
    (split, it would hold both devices for a step while the second waits)."""
    degrees: list[int] = []
    devices, engine = _engine(2, on_degree=degrees.append)
    engine.step_s.update({1: 30.0, 2: 20.0})  # the split is the faster: a lone request is split
    try:
        first = engine.submit(_loop(sd3_call(2), 1))
        assert devices.next_call(0) == (0, CFG)
        second = engine.submit(_loop(sd3_call(2), 1))
        assert devices.next_call(1) == (1, ONE)
        devices.finish(0)
        devices.finish(1)
        assert first.result(timeout=30) == second.result(timeout=30) == "done"
        again = engine.submit(_loop(sd3_call(2), 1))  # alone, but within 30 s of the two
        assert devices.next_call(0) == (0, ONE)
        devices.finish(0)
        assert again.result(timeout=30) == "done"
    finally:
        engine.close()
    assert degrees == [2, 1, 1]


def test_a_newcomer_on_a_shrunk_units_devices_batches_with_its_requests() -> None:
    sizes: list[int] = []
    devices, engine = _engine(2, max_batch=2, on_batch=sizes.append)
    try:
        first = engine.submit(_loop(sd3_call(2), 3))
        assert devices.next_call(0) == (0, CFG)
        second = engine.submit(_loop(sd3_call(2), 3))  # the first one shrinks to device 0
        assert devices.next_call(1) == (1, ONE)
        third = engine.submit(_loop(sd3_call(2), 2))  # both devices hold one: device 0, with the first
        devices.finish(0)
        assert devices.next_call(0) == (0, ONE)  # the first and the third in one call
        devices.finish(0, 10)
        devices.finish(1, 10)
        assert [f.result(timeout=30) for f in (first, second, third)] == ["done"] * 3
    finally:
        engine.close()
    assert sizes.count(2) == 2 and max(sizes) == 2  # the third's two steps ran beside the first's


def test_fixed_modes_never_move_a_request() -> None:
    from services.denoiser.group.engine import GroupEngine

    devices = _Devices(2)
    engine = GroupEngine(devices, max_batch=1, mode="always")  # type: ignore[arg-type]
    try:
        first = engine.submit(_loop(sd3_call(2), 2))
        assert devices.next_call(0) == (0, CFG)
        second = engine.submit(_loop(sd3_call(2), 2))  # always split: it waits for the same two devices
        devices.finish(0)
        for _ in range(3):  # the rest of both, one after the other, each on both devices
            assert devices.next_call(0) == (0, CFG)
            devices.finish(0)
        assert [f.result(timeout=30) for f in (first, second)] == ["done"] * 2
    finally:
        engine.close()


def test_a_channel_carries_every_dtype_and_shape_exactly_and_says_when_the_other_end_is_gone() -> None:
    import socket
    import threading

    here, there = (wire.Channel(s) for s in socket.socketpair())
    odd = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),  # 30 bytes: the next tensor starts padded
        "expanded": torch.tensor([7.0]).expand(4),  # stride 0
        "scalar": torch.tensor(2.5),
        "flags": torch.tensor([True, False, True]),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "empty": torch.zeros(0, 4),
        "nested": [torch.ones(2, 2), {"x": None, "s": "text"}],
    }
    # a message larger than a socket's buffer, sent from another thread as the leader's lane does
    big = torch.randn(300, 1000)
    sender = threading.Thread(target=lambda: here.send({"op": "run", **odd, "big": big}))
    sender.start()
    got = there.recv(torch.device("cpu"))
    sender.join()
    assert got["op"] == "run" and got["nested"][1] == {"x": None, "s": "text"}
    for key in ("bf16", "expanded", "scalar", "flags", "ids", "empty"):
        assert got[key].dtype == odd[key].dtype and got[key].shape == odd[key].shape, key
        assert torch.equal(got[key], odd[key]), key
    assert torch.equal(got["big"], big) and torch.equal(got["nested"][0], torch.ones(2, 2))
    here.close()
    with pytest.raises(ConnectionError, match="gone"):
        there.recv(torch.device("cpu"))
    there.close()
