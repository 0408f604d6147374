"""The full-size architectures: the published parameter counts, and the random-weight SD3
directory that the GPU benchmark (`bench/overhead.py --full-size`) serves through the mesh.

Why test here: the GPU run happens only in sessions lent a GPU; its first step (writing the
directory) and the loaders' reading it must already work on this CPU.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch

from shared.settings import Settings
from shared.zoo import load_denoiser, load_text_encoder, load_vae
from shared.zoo.full_size import (
    BYTES_PER_PARAM,
    PARAM_GIB,
    build_full_size,
    parameter_count,
    write_full_size_sd3,
)


@pytest.mark.parametrize(
    "model_id,billions",
    [
        ("sd3-transformer", 2.03),
        ("t5", 4.76),
        ("clip-g", 0.69),
        ("clip-l", 0.12),
        ("flux-transformer", 11.90),
        ("sd15-unet", 0.86),
        ("sd15-clip", 0.12),
        ("sd15-vae", 0.08),
        ("sdxl-unet", 2.57),
        ("sdxl-vae", 0.08),
    ],
)
def test_published_sizes(model_id: str, billions: float) -> None:
    assert parameter_count(build_full_size(model_id)) / 1e9 == pytest.approx(billions, abs=0.01)


@pytest.mark.parametrize("model_id", sorted(PARAM_GIB))
def test_the_memory_table_the_benchmarks_use_is_the_configs(model_id: str) -> None:
    gib = parameter_count(build_full_size(model_id)) * BYTES_PER_PARAM / 2**30
    assert PARAM_GIB[model_id] == pytest.approx(gib, abs=0.006)


RAM_DISK = Path("/dev/shm")
RAM_DISK_ROOM = 4 * 2**30  # the directory below is 1.3 GB


def _memory_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where there is none)."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:")), 0)


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """Where the 1.3 GB directory is written: in memory (tmpfs) where there is room, else in
    tmp_path. Why: on a slow disk writing it took ten of the test's 25 seconds, and the test is
    about what the directory holds, not about the disk."""
    if RAM_DISK.is_dir() and min(shutil.disk_usage(RAM_DISK).free, _memory_available()) >= RAM_DISK_ROOM:
        with tempfile.TemporaryDirectory(prefix="lego-full-size-", dir=RAM_DISK) as path:
            yield Path(path)
    else:
        yield tmp_path


def test_random_weight_sd3_directory_loads_at_full_width(settings: Settings, scratch: Path) -> None:
    directory = write_full_size_sd3(scratch / "sd3", device="cpu", dtype="bfloat16", max_layers=1)
    assert (directory / "model_index.json").is_file()
    full = dataclasses.replace(settings, models_dir=str(directory), dtype="bfloat16")
    t5 = load_text_encoder("t5", full)
    assert t5.model.config.d_model == 4096 and t5.model.config.num_layers == 1
    assert t5.model.dtype == torch.bfloat16
    assert load_text_encoder("clip-g", full).model.config.hidden_size == 1280
    transformer = load_denoiser("sd3-transformer", full).transformer
    assert transformer.config.caption_projection_dim == 1536 and transformer.config.num_layers == 1
    assert load_vae("sd3-vae", full).vae.config.block_out_channels == [128, 256, 512, 512]
    # The tiny tokenizers' special ids are the text encoders' (CLIP pools at its eos token).
    clip_l = load_text_encoder("clip-l", full)
    assert clip_l.model.config.eos_token_id == clip_l.tokenizer.eos_token_id
    # Written once: a second call reuses the directory.
    mtime = (directory / "transformer").stat().st_mtime
    assert write_full_size_sd3(scratch / "sd3", device="cpu", dtype="bfloat16", max_layers=1) == directory
    assert (directory / "transformer").stat().st_mtime == mtime
