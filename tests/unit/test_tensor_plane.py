"""Tensor plane: codecs, and put/get between two planes over inline, tcp and shm."""

from __future__ import annotations

import asyncio
import hashlib
import json
import mmap
import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import torch

from shared.settings import Settings
from shared.tensor_plane import RawTensor, TensorPlane, TensorUnavailable
from shared.tensor_plane.shm import segment_exists, shm_supported
from shared.tensor_plane.torch_codec import from_raw, to_raw

on_session_loop = pytest.mark.asyncio(loop_scope="session")  # same loop as the plane fixtures

REPO = Path(__file__).resolve().parents[2]
needs_shm = pytest.mark.skipif(not shm_supported(), reason="needs POSIX shared memory under /dev/shm")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]


def make_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bits for every dtype (so NaN payloads, -0.0 and denormals are covered too)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    if dtype == torch.int64:
        return torch.randint(-(2**62), 2**62, shape, generator=g, dtype=torch.int64)
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[dtype]
    info = torch.iinfo(bits)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=bits).view(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    assert a.dtype == b.dtype and a.shape == b.shape
    return (
        a.contiguous().reshape(-1).view(torch.uint8).tolist() == b.contiguous().reshape(-1).view(torch.uint8).tolist()
    )


@pytest_asyncio.fixture(loop_scope="session")
async def make_plane():
    """Factory of started planes, all closed at teardown."""
    planes: list[TensorPlane] = []

    async def make(**overrides: object) -> TensorPlane:
        plane = TensorPlane(Settings(**overrides))  # type: ignore[arg-type]
        await plane.start()
        planes.append(plane)
        return plane

    yield make
    for plane in planes:
        await plane.close()


# -- RawTensor / codec ---------------------------------------------------------------------------


def test_raw_numpy_roundtrip_and_validation():
    a = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]  # non-contiguous
    raw = RawTensor.from_numpy(a)
    assert raw.shape == (4, 3) and raw.dtype == "float32" and raw.nbytes == 48
    assert np.array_equal(raw.to_numpy(), a)
    scalar = RawTensor.from_numpy(np.array(3, dtype=np.int64))
    assert scalar.shape == () and scalar.to_numpy() == 3
    assert RawTensor.from_numpy(np.zeros((0, 5), np.float16)).to_numpy().shape == (0, 5)
    big_endian = np.arange(4, dtype=">i4")
    assert np.array_equal(RawTensor.from_numpy(big_endian).to_numpy(), np.arange(4))
    with pytest.raises(ValueError, match="bytes of data"):
        RawTensor(b"\0" * 7, "float32", (2,))
    with pytest.raises(ValueError, match="unsupported dtype"):
        RawTensor(b"", "complex64", (0,))
    with pytest.raises(ValueError, match="bfloat16 has no numpy dtype"):
        RawTensor(b"\0\0", "bfloat16", (1,)).to_numpy()


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64, torch.int32, torch.int16, torch.int8])
@pytest.mark.parametrize("shape", [(3, 5), (), (0, 4)], ids=["2d", "scalar", "empty"])
def test_torch_codec_bit_exact(dtype: torch.dtype, shape: tuple[int, ...]):
    t = make_tensor(dtype, shape) if dtype in DTYPES else torch.arange(15).reshape(3, 5).to(dtype)
    if dtype not in DTYPES and shape != (3, 5):
        t = torch.zeros(shape, dtype=dtype)
    back = from_raw(to_raw(t))
    assert same_bits(t, back)
    back.add_(back.to(torch.uint8).to(dtype) if dtype != torch.bool else back)  # writable


def test_torch_codec_non_contiguous_and_readonly():
    t = make_tensor(torch.bfloat16, (6, 8)).t()[::2]
    assert not t.is_contiguous()
    raw = to_raw(t)
    assert same_bits(t, from_raw(raw))
    readonly = RawTensor(raw.tobytes(), raw.dtype, raw.shape)
    back = from_raw(readonly)
    back.zero_()  # a copy, so bytes stay untouched and no warning is raised
    assert same_bits(t, from_raw(readonly))


def test_package_import_does_not_import_torch():
    code = "import sys, shared.tensor_plane as tp; tp.RawTensor; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


# -- planes ---------------------------------------------------------------------------------------

TRANSPORTS = ["inline", "tcp", pytest.param("shm", marks=needs_shm)]


async def pair(make_plane, transport: str) -> tuple[TensorPlane, TensorPlane]:
    if transport == "inline":
        return await make_plane(inline_max_bytes=1 << 20), await make_plane()
    return (
        await make_plane(transport=transport, inline_max_bytes=0),
        await make_plane(transport=transport, inline_max_bytes=0),
    )


@on_session_loop
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_roundtrip_bit_exact(make_plane, transport: str):
    producer, consumer = await pair(make_plane, transport)
    cases = [make_tensor(dt, (7, 9), seed=i) for i, dt in enumerate(DTYPES)]
    cases += [make_tensor(torch.float32, (8, 6)).t()[1:], make_tensor(torch.int64, ()), torch.zeros(0, 3)]
    refs = [producer.put(to_raw(t), owner="req-1") for t in cases]
    for t, ref in zip(cases, refs, strict=True):
        assert (ref.inline is not None) == (transport == "inline" or t.numel() == 0)
        if ref.inline is None:
            assert ref.uri == producer.uri and ref.token and ref.host == producer.host
        got = await consumer.get(ref)
        assert same_bits(t, from_raw(got))
        assert same_bits(t, from_raw(await consumer.get(ref)))  # not freed on first read
    fetched = consumer.stats["fetched"]
    if transport != "inline":
        assert fetched[transport]["count"] == 2 * (len(cases) - 1)


@needs_shm
@on_session_loop
async def test_shm_get_is_zero_copy_and_copy_on_write(make_plane):
    producer, consumer = await pair(make_plane, "shm")
    ref = producer.put(RawTensor.from_numpy(np.arange(100_000, dtype=np.float32)), owner="r")
    got = await consumer.get(ref)
    assert isinstance(got.data, memoryview) and isinstance(got.data.obj, mmap.mmap)
    arr = got.to_numpy()
    arr[:] = -1  # writes stay private to the consumer
    again = (await consumer.get(ref)).to_numpy()
    assert np.array_equal(again, np.arange(100_000, dtype=np.float32))


@on_session_loop
@pytest.mark.parametrize("transport", ["tcp", pytest.param("shm", marks=needs_shm)])
async def test_wrong_token_and_unknown_key_refused(make_plane, transport: str):
    producer, consumer = await pair(make_plane, transport)
    ref = producer.put(RawTensor.from_numpy(np.ones(1000, np.float32)), owner="r")
    with pytest.raises(TensorUnavailable, match="wrong token") as info:
        await consumer.get(ref.model_copy(update={"token": "not-the-token"}))
    assert info.value.key == ref.key and ref.key in str(info.value)
    with pytest.raises(TensorUnavailable, match="unknown key"):
        await consumer.get(ref.model_copy(update={"key": "nope"}))
    assert producer.stats["refused"][transport]["count"] == 2
    assert np.array_equal((await consumer.get(ref)).to_numpy(), np.ones(1000, np.float32))


@on_session_loop
@pytest.mark.parametrize("token", [None, "", "not-the-token"], ids=["no-token", "empty-token", "wrong-token"])
async def test_the_tcp_server_refuses_a_read_without_the_right_token(make_plane, token: str | None):
    """The server, not the client, checks the token: a raw request with no token, an empty one
    or a wrong one gets a refusal line and not one byte of the tensor (the next line on the
    same connection is the answer to the next request)."""
    from shared.tensor_plane.protocol import decode_header, encode_header, parse_uri

    producer = await make_plane(transport="tcp", inline_max_bytes=0)
    ref = producer.put(RawTensor.from_numpy(np.full(1000, 42, np.float32)), owner="r")
    request = {"op": "get", "key": ref.key, "mode": "tcp"} | ({} if token is None else {"token": token})
    reader, writer = await asyncio.open_connection(*parse_uri(ref.uri))
    try:
        writer.write(encode_header(request))
        await writer.drain()
        reply = decode_header(await asyncio.wait_for(reader.readline(), 10))
        writer.write(encode_header({**request, "token": ref.token}))
        await writer.drain()
        right = decode_header(await asyncio.wait_for(reader.readline(), 10))
    finally:
        writer.close()
    assert reply == {"ok": False, "code": "unavailable", "error": "wrong token"}
    assert right == {"ok": True, "nbytes": 4000}
    assert producer.stats["refused"]["tcp"]["count"] == 1


@on_session_loop
@pytest.mark.parametrize("transport", ["tcp", pytest.param("shm", marks=needs_shm)])
async def test_release_frees(make_plane, transport: str):
    producer, consumer = await pair(make_plane, transport)
    a = [producer.put(RawTensor.from_numpy(np.full(5000, i, np.int32)), owner="A") for i in range(2)]
    b = producer.put(RawTensor.from_numpy(np.full(5000, 7, np.int32)), owner="B")
    held = await consumer.get(a[0])  # a mapping/buffer taken before release stays valid
    segments = [producer.store.segment_name(r.key) for r in a]
    assert all(segments) == (transport == "shm")
    assert producer.release("A") == 2
    assert producer.release("A") == 0
    for ref in a:
        with pytest.raises(TensorUnavailable, match="unknown key"):
            await consumer.get(ref)
    if transport == "shm":
        assert not any(segment_exists(name) for name in segments)
    assert np.array_equal(held.to_numpy(), np.zeros(5000, np.int32))
    assert np.array_equal((await consumer.get(b)).to_numpy(), np.full(5000, 7, np.int32))
    assert producer.stats["stored"] == {"count": 1, "bytes": 20000}


@on_session_loop
async def test_ttl_expiry(make_plane):
    producer = await make_plane(inline_max_bytes=0, tensor_ttl_s=1.0)
    consumer = await make_plane()
    ref = producer.put(RawTensor.from_numpy(np.ones(10, np.float64)), owner="r")
    name = producer.store.segment_name(ref.key)
    assert (await consumer.get(ref)).to_numpy().sum() == 10
    # Nobody releases it: the background sweeper (every ttl/4) frees it once the TTL has passed.
    give_up = time.monotonic() + 30
    while producer.stats["stored"]["count"] and time.monotonic() < give_up:
        await asyncio.sleep(0.05)
    assert producer.stats["stored"]["count"] == 0
    if name:
        assert not segment_exists(name)
    with pytest.raises(TensorUnavailable, match="unknown key"):
        await consumer.get(ref)


@on_session_loop
async def test_put_from_many_threads(make_plane):
    producer, consumer = await pair(make_plane, "tcp")
    barrier = threading.Barrier(8)

    def work(i: int):
        barrier.wait()
        return [
            (i, j, producer.put(RawTensor.from_numpy(np.full(300, i * 100 + j, np.int64)), f"o{i}")) for j in range(10)
        ]

    with ThreadPoolExecutor(8) as pool:
        results = [r for chunk in pool.map(work, range(8)) for r in chunk]
    assert len({ref.key for _, _, ref in results}) == 80
    got = await asyncio.gather(*(consumer.get(ref) for _, _, ref in results))
    for (i, j, _), raw in zip(results, got, strict=True):
        assert np.array_equal(raw.to_numpy(), np.full(300, i * 100 + j, np.int64))
    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(producer.release, [f"o{i}" for i in range(8)])) == 80


@on_session_loop
@pytest.mark.parametrize("transport", ["tcp", pytest.param("shm", marks=needs_shm)])
async def test_64mib(make_plane, transport: str):
    producer, consumer = await pair(make_plane, transport)
    a = np.random.default_rng(1).integers(0, 2**31, 16 << 20, dtype=np.int32)
    ref = producer.put(RawTensor.from_numpy(a), owner="big")
    assert ref.nbytes == 64 << 20
    for _ in range(2):
        assert np.array_equal((await consumer.get(ref)).to_numpy(), a)


@on_session_loop
async def test_forced_shm_refuses_other_host_and_unreachable_producer(make_plane):
    consumer = await make_plane(transport="tcp")
    producer = await make_plane(inline_max_bytes=0)
    ref = producer.put(RawTensor.from_numpy(np.ones(10, np.float32)), owner="r")
    if shm_supported():
        forced = await make_plane(transport="shm")
        with pytest.raises(TensorUnavailable, match="transport=shm"):
            await forced.get(ref.model_copy(update={"host": "elsewhere/boot"}))
    uri = producer.uri
    await producer.close()
    with pytest.raises(TensorUnavailable, match="unreachable"):
        await consumer.get(ref.model_copy(update={"uri": uri}))


CHILD = textwrap.dedent(
    """
    import asyncio, hashlib, json, mmap, sys
    from shared.messages import TensorRef
    from shared.settings import Settings
    from shared.tensor_plane import TensorPlane, TensorUnavailable

    async def main():
        ref = TensorRef.model_validate_json(sys.argv[1])
        plane = TensorPlane(Settings(transport="shm"))
        raw = await plane.get(ref)
        out = {"sha": hashlib.sha256(raw.buffer()).hexdigest(), "mmap": isinstance(raw.data.obj, mmap.mmap)}
        try:
            await plane.get(ref.model_copy(update={"token": "bad"}))
        except TensorUnavailable as exc:
            out["refused"] = exc.reason
        await plane.close()
        print(json.dumps(out))

    asyncio.run(main())
    """
)


@needs_shm
@on_session_loop
async def test_shm_across_processes(make_plane):
    producer = await make_plane(transport="shm", inline_max_bytes=0)
    a = np.random.default_rng(2).integers(0, 255, 3 << 20, dtype=np.uint8)
    ref = producer.put(RawTensor.from_numpy(a), owner="x")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        ref.model_dump_json(),
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    assert b"leaked" not in err and b"Warning" not in err, err.decode()  # no resource_tracker noise
    result = json.loads(out)
    assert result == {
        "sha": hashlib.sha256(a).hexdigest(),
        "mmap": True,
        "refused": f"refused by {producer.uri}: wrong token",
    }
    assert producer.stats["served"]["shm"]["count"] == 1
    name = producer.store.segment_name(ref.key)
    assert name and segment_exists(name)  # the consumer exiting did not unlink it
    producer.release("x")
    assert not segment_exists(name)
