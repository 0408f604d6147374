"""Tensor plane over UCX (ucxx, the optional `.[ucx]` extra): bit-exact round trips over TCP on a
CPU machine, token checks, pooled endpoints, clean process exit; GPU paths where there is a GPU;
and the plane without ucxx (auto never picks it, forcing it names the extra to install)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import torch

from shared.messages import TensorRef
from shared.settings import Settings
from shared.tensor_plane import RawTensor, TensorPlane, TensorUnavailable, ucx
from shared.tensor_plane.shm import shm_supported
from shared.tensor_plane.torch_codec import from_raw, to_raw
from tests.unit.test_tensor_plane import DTYPES, make_tensor, same_bits

REPO = Path(__file__).resolve().parents[2]
on_session_loop = pytest.mark.asyncio(loop_scope="session")
needs_ucx = pytest.mark.skipif(not ucx.ucx_installed(), reason="needs the ucx extra: pip install '.[ucx]'")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def ucx_held():
    """Hold one UCX user for the module: the context is set up once, not once per test (its
    teardown waits up to 1 s for ucxx's notifier thread). Released, and checked gone, at the end."""
    if not ucx.ucx_installed():
        yield
        return
    ucx.RUNTIME.acquire()
    yield
    ucx.RUNTIME.release()
    assert ucx.RUNTIME.users == 0


@pytest_asyncio.fixture(loop_scope="session")
async def make_plane(ucx_held):
    planes: list[TensorPlane] = []

    async def make(**overrides: object) -> TensorPlane:
        plane = TensorPlane(Settings(**overrides))  # type: ignore[arg-type]
        await plane.start()
        planes.append(plane)
        return plane

    yield make
    for plane in planes:
        await plane.close()


async def ucx_pair(make_plane) -> tuple[TensorPlane, TensorPlane]:
    return (
        await make_plane(transport="ucx", inline_max_bytes=0),
        await make_plane(transport="ucx", inline_max_bytes=0),
    )


# -- with ucxx ------------------------------------------------------------------------------------


@needs_ucx
@on_session_loop
async def test_ucx_roundtrip_bit_exact(make_plane):
    producer, consumer = await ucx_pair(make_plane)
    assert producer.ucx_uri and producer.ucx_uri.startswith("ucx://127.0.0.1:")
    cases = [make_tensor(dt, (7, 9), seed=i) for i, dt in enumerate(DTYPES)]
    cases += [
        make_tensor(torch.bfloat16, (6, 8)).t()[::2],  # non-contiguous bf16
        make_tensor(torch.float32, (8, 6)).t()[1:],
        make_tensor(torch.int64, ()),
        torch.zeros(0, 3),  # zero-size: always inline, no round trip
    ]
    refs = [producer.put(to_raw(t), owner="req-1") for t in cases]
    for t, ref in zip(cases, refs, strict=True):
        assert (ref.inline is not None) == (t.numel() == 0)
        if ref.inline is None:
            assert ref.ucx_uri == producer.ucx_uri and ref.uri == producer.uri and ref.token
        assert same_bits(t, from_raw(await consumer.get(ref)))
        assert same_bits(t, await consumer.get_tensor(ref))  # not freed on first read
    carried = len(cases) - 1
    assert consumer.stats["fetched"]["ucx"]["count"] == 2 * carried
    assert producer.stats["served"]["ucx"]["count"] == 2 * carried
    assert "tcp" not in consumer.stats["fetched"] and "shm" not in consumer.stats["fetched"]


@needs_ucx
@on_session_loop
async def test_ucx_refuses_bad_token_and_unknown_key(make_plane):
    producer, consumer = await ucx_pair(make_plane)
    ref = producer.put(RawTensor.from_numpy(np.ones(1000, np.float32)), owner="r")
    with pytest.raises(TensorUnavailable, match="wrong token") as info:
        await consumer.get(ref.model_copy(update={"token": "not-the-token"}))
    assert info.value.key == ref.key and producer.ucx_uri in info.value.reason
    with pytest.raises(TensorUnavailable, match="wrong token"):
        await consumer.get_tensor(ref.model_copy(update={"token": ""}))
    with pytest.raises(TensorUnavailable, match="unknown key"):
        await consumer.get(ref.model_copy(update={"key": "nope"}))
    assert producer.stats["refused"]["ucx"]["count"] == 3
    # A refusal leaves the endpoint usable: the good token still reads, on the same endpoint.
    assert np.array_equal((await consumer.get(ref)).to_numpy(), np.ones(1000, np.float32))


@needs_ucx
@on_session_loop
async def test_ucx_endpoints_pooled_and_reused(make_plane):
    producer, consumer = await ucx_pair(make_plane)
    refs = [producer.put(RawTensor.from_numpy(np.full(4096, i, np.int32)), owner="p") for i in range(8)]
    client = consumer._ucx_client
    assert client is not None
    for i, ref in enumerate(refs):
        assert (await consumer.get(ref)).to_numpy()[0] == i
    assert client.idle_count == 1  # sequential reads: one endpoint, reused
    got = await asyncio.gather(*(consumer.get(ref) for ref in refs))  # concurrent: a few more
    assert [g.to_numpy()[0] for g in got] == list(range(8))
    assert 1 <= client.idle_count <= 4
    assert producer.release("p") == 8
    with pytest.raises(TensorUnavailable, match="unknown key"):
        await consumer.get(refs[0])


@needs_ucx
@on_session_loop
async def test_ucx_64mib_and_timeout_mid_transfer(make_plane):
    producer, consumer = await ucx_pair(make_plane)
    a = np.random.default_rng(1).integers(0, 2**31, 16 << 20, dtype=np.int32)
    ref = producer.put(RawTensor.from_numpy(a), owner="big")
    assert np.array_equal((await consumer.get(ref)).to_numpy(), a)
    # A read cut off mid-transfer aborts its endpoint (never pooled again); the next read works.
    with pytest.raises(TensorUnavailable, match="timed out"):
        await consumer.get(ref, timeout_s=0.001)
    assert np.array_equal((await consumer.get(ref)).to_numpy(), a)


CUT_OFF_READS = textwrap.dedent(
    """
    import asyncio
    import numpy as np
    from shared.settings import Settings
    from shared.tensor_plane import RawTensor, TensorPlane, TensorUnavailable

    async def main():
        producer = TensorPlane(Settings(transport="ucx", inline_max_bytes=0))
        consumer = TensorPlane(Settings(transport="ucx", inline_max_bytes=0))
        await producer.start()
        await consumer.start()
        a = np.random.default_rng(1).integers(0, 2**31, 16 << 20, dtype=np.int32)
        ref = producer.put(RawTensor.from_numpy(a), owner="big")
        timeouts = 0
        for _ in range(8):
            for limit in (0.001, 0.003, 0.01, 0.02):  # mid-connect, mid-frame, mid-payload
                try:
                    await consumer.get(ref, timeout_s=limit)
                except TensorUnavailable:
                    timeouts += 1
            assert np.array_equal((await consumer.get(ref)).to_numpy(), a)
        await consumer.close()
        await producer.close()
        print(timeouts)

    asyncio.run(main())
    """
)


@needs_ucx
@on_session_loop
async def test_ucx_reads_cut_off_at_any_point_never_hang_or_crash_the_process():
    # Cancelling ucxx's pending operations on the loop's thread once hung a CI run (UCX's worker
    # lock against its progress thread) and crashed the process in a stress run; it runs in a
    # child so that either fails this test instead of the suite.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CUT_OFF_READS, cwd=REPO, env=ENV, stdout=-1, stderr=-1
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail("cut-off UCX reads hung the consumer")
    assert proc.returncode == 0, err.decode()[-2000:]
    assert int(out) >= 8  # at least the 1 ms reads were cut off
    assert b"ERROR" not in err


@needs_ucx
@on_session_loop
async def test_selection_auto_keeps_shm_tcp_for_host_tensors(make_plane):
    # auto on a machine without GPU: no UCX offered at all, unless ucx_enabled=on.
    plain = await make_plane(inline_max_bytes=0)
    assert (plain.ucx_uri is None) == (not ucx.cuda_present())
    offering = await make_plane(inline_max_bytes=0, ucx_enabled="on")
    consumer = await make_plane(ucx_enabled="on")
    ref = offering.put(RawTensor.from_numpy(np.arange(5000, dtype=np.int64)), owner="o")
    assert ref.ucx_uri == offering.ucx_uri and ref.device == "cpu"
    assert np.array_equal((await consumer.get(ref)).to_numpy(), np.arange(5000))
    host_transport = "shm" if shm_supported() else "tcp"
    assert list(consumer.stats["fetched"]) == [host_transport]  # a host tensor never goes over UCX in auto
    # Forced ucx against a producer that offers none: a clear refusal, not a hang.
    forced = await make_plane(transport="ucx")
    tcp_only = await make_plane(transport="tcp", inline_max_bytes=0)
    no_ucx = tcp_only.put(RawTensor.from_numpy(np.ones(10, np.float32)), owner="o")
    with pytest.raises(TensorUnavailable, match="offers no UCX endpoint"):
        await forced.get(no_ucx)
    with pytest.raises(ValueError, match="contradicts"):
        TensorPlane(Settings(transport="ucx", ucx_enabled="off"))


CONSUMER = textwrap.dedent(
    """
    import asyncio, hashlib, json, sys, threading
    from shared.messages import TensorRef
    from shared.settings import Settings
    from shared.tensor_plane import TensorPlane, TensorUnavailable

    async def main():
        ref = TensorRef.model_validate_json(sys.argv[1])
        plane = TensorPlane(Settings(transport="ucx"))  # consumer only: never started
        raw = await plane.get(ref)
        out = {"sha": hashlib.sha256(raw.buffer()).hexdigest()}
        try:
            await plane.get(ref.model_copy(update={"token": "bad"}))
        except TensorUnavailable as exc:
            out["refused"] = exc.reason
        await plane.close()
        out["threads"] = sorted(t.name for t in threading.enumerate())
        print(json.dumps(out))

    asyncio.run(main())
    """
)


@needs_ucx
@on_session_loop
async def test_ucx_across_processes_and_clean_exit(make_plane):
    producer = await make_plane(transport="ucx", inline_max_bytes=0)
    a = np.random.default_rng(2).integers(0, 255, 3 << 20, dtype=np.uint8)
    ref = producer.put(RawTensor.from_numpy(a), owner="x")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CONSUMER, ref.model_dump_json(), cwd=REPO, env=ENV, stdout=-1, stderr=-1
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)  # a hang at exit fails here
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["sha"] == hashlib.sha256(a).hexdigest()
    assert result["refused"] == f"refused by {producer.ucx_uri}: wrong token"
    assert result["threads"] == ["MainThread"]  # UCX's notifier thread stopped by close()
    assert producer.stats["served"]["ucx"]["count"] == 1


PRODUCER = textwrap.dedent(
    """
    import asyncio, sys
    import numpy as np
    from shared.settings import Settings
    from shared.tensor_plane import RawTensor, TensorPlane

    async def main():
        plane = TensorPlane(Settings(transport="ucx", inline_max_bytes=0))
        await plane.start()
        ref = plane.put(RawTensor.from_numpy(np.arange(1000, dtype=np.float32)), "o")
        print(ref.model_dump_json(), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await plane.close()

    asyncio.run(main())
    """
)


@needs_ucx
@on_session_loop
async def test_ucx_dead_producer_is_unavailable_quickly(make_plane):
    consumer = await make_plane(transport="ucx")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PRODUCER, cwd=REPO, env=ENV, stdin=-1, stdout=-1, stderr=-1
    )
    try:
        assert proc.stdout is not None
        ref = TensorRef.model_validate_json(await asyncio.wait_for(proc.stdout.readline(), 60))
        assert (await consumer.get(ref)).to_numpy()[-1] == 999
    finally:
        proc.kill()
        await proc.wait()
    t0 = time.monotonic()
    with pytest.raises(TensorUnavailable, match="unreachable"):
        await consumer.get(ref, timeout_s=20)  # the pooled endpoint is stale, a new one fails
    assert time.monotonic() - t0 < 10


UNCLOSED = textwrap.dedent(
    """
    import asyncio
    import numpy as np
    from shared.settings import Settings
    from shared.tensor_plane import RawTensor, TensorPlane

    async def main():
        producer = TensorPlane(Settings(transport="ucx", inline_max_bytes=0))
        await producer.start()
        ref = producer.put(RawTensor.from_numpy(np.ones(1000, np.float32)), "o")
        assert (await TensorPlane(Settings(transport="ucx")).get(ref)).to_numpy().sum() == 1000
        # neither plane is closed: ucxx's notifier thread (not a daemon) must not block exit

    asyncio.run(main())
    """
)


@needs_ucx
@on_session_loop
async def test_unclosed_planes_do_not_block_exit():
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", UNCLOSED, cwd=REPO, env=ENV, stderr=-1)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()


# -- GPU (skipped without one) -------------------------------------------------------------------


@needs_ucx
@needs_gpu
@on_session_loop
async def test_cuda_tensor_stays_on_device_over_ucx(make_plane):
    producer = await make_plane(inline_max_bytes=0)  # auto: a GPU box offers UCX
    consumer = await make_plane()
    if producer.ucx_uri is None or not ucx.RUNTIME.cuda:
        pytest.skip("UCX without CUDA transports here (check UCX_TLS)")
    cases = [make_tensor(dt, (64, 33), seed=i).cuda() for i, dt in enumerate(DTYPES)]
    cases.append(make_tensor(torch.bfloat16, (32, 16)).cuda().t())  # non-contiguous on the device
    for t in cases:
        ref = producer.put_tensor(t, owner="g")
        assert ref.device.startswith("cuda") and ref.ucx_uri == producer.ucx_uri
        got = await consumer.get_tensor(ref, device="cuda")
        assert got.is_cuda and same_bits(t.cpu(), got.cpu())
        assert same_bits(t.cpu(), from_raw(await consumer.get(ref)))  # a host consumer: ucx into host memory
    assert producer.stats["put"]["cuda"]["count"] == len(cases)
    assert consumer.stats["fetched"]["ucx"]["count"] == 2 * len(cases)
    tcp = await make_plane(transport="tcp")  # no UCX: the producer copies device -> host once
    ref = producer.put_tensor(cases[0], owner="g")
    assert same_bits(cases[0].cpu(), from_raw(await tcp.get(ref)))
    with pytest.raises(TensorUnavailable, match="wrong token"):
        await consumer.get_tensor(ref.model_copy(update={"token": "x"}), device="cuda")


@needs_gpu
@on_session_loop
async def test_cuda_tensor_without_ucx_goes_through_host(make_plane):
    producer = await make_plane(inline_max_bytes=0, ucx_enabled="off")
    consumer = await make_plane(ucx_enabled="off")
    t = make_tensor(torch.float16, (128, 64)).cuda()
    ref = producer.put_tensor(t, owner="g")
    assert ref.device == "cpu" and ref.ucx_uri is None
    got = await consumer.get_tensor(ref, device="cuda")
    assert got.is_cuda and same_bits(t.cpu(), got.cpu())


# -- without ucxx ----------------------------------------------------------------------------------


def test_import_does_not_load_ucxx():
    code = (
        "import sys, shared.tensor_plane as tp, shared.tensor_plane.plane, shared.tensor_plane.ucx;"
        "assert not {'ucxx', 'ucp', 'torch'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, check=True, timeout=120)


@on_session_loop
async def test_without_ucxx_auto_never_picks_it_and_forcing_names_the_extra(make_plane, monkeypatch):
    monkeypatch.setattr(ucx, "ucx_installed", lambda: False)
    with pytest.raises(ValueError, match=r"pip install '\.\[ucx\]'"):
        TensorPlane(Settings(transport="ucx"))
    producer = await make_plane(inline_max_bytes=0, ucx_enabled="on")
    assert producer.ucx_uri is None
    ref = producer.put(RawTensor.from_numpy(np.ones(100, np.float32)), owner="o")
    assert ref.ucx_uri is None
    consumer = await make_plane()
    assert (await consumer.get(ref)).to_numpy().sum() == 100


def test_forced_ucx_when_ucxx_fails_to_load(monkeypatch):
    def broken() -> None:
        raise ucx.UcxUnavailable(f"the ucx transport needs ucxx, which is not installed: {ucx.INSTALL_HINT}")

    monkeypatch.setattr(ucx, "ucx_installed", lambda: True)
    monkeypatch.setattr(ucx, "_import_backend", broken)
    runtime = ucx.UcxRuntime()

    async def go() -> None:
        with pytest.raises(ucx.UcxUnavailable, match=r"pip install"):
            runtime.acquire()

    asyncio.run(go())
    assert runtime.users == 0
