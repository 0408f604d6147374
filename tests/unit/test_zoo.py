"""The model zoo: ids, errors, deterministic weights, the on-disk cache, tokenizers."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the hub

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared.settings import Settings
from shared.zoo import (
    MODEL_IDS,
    build_reference_pipeline,
    ensure_tiny_models,
    load_denoiser,
    load_model,
    load_text_encoder,
    load_vae,
    models_root,
    tiny,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    s = Settings(model_cache_dir=str(tmp_path_factory.mktemp("zoo-cache")))
    ensure_tiny_models(s)
    return s


def _weights(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(p.relative_to(root)): load_file(p) for p in sorted(root.rglob("*.safetensors"))}


def test_model_ids() -> None:
    assert MODEL_IDS == ("clip-l", "clip-g", "t5", "sd3-transformer", "sd3-vae")
    assert all(m.replace("-", "").isalnum() for m in MODEL_IDS)  # safe as a NATS subject token


def test_unknown_id_names_known_ids(settings: Settings) -> None:
    with pytest.raises(ValueError, match="clip-l"):
        load_model("sdxl-unet", settings)
    with pytest.raises(ValueError, match="sd3-transformer"):
        load_denoiser("clip-l", settings)
    with pytest.raises(ValueError, match="t5"):
        load_text_encoder("sd3-vae", settings)
    with pytest.raises(ValueError, match="sd3-vae"):
        load_vae("t5", settings)


def test_layout_and_bundles(settings: Settings) -> None:
    root = ensure_tiny_models(settings)
    for sub in (
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
        "transformer",
        "vae",
        "scheduler",
    ):
        assert (root / sub).is_dir(), sub
    clip_l = load_text_encoder("clip-l", settings)
    clip_g = load_text_encoder("clip-g", settings)
    t5 = load_text_encoder("t5", settings)
    assert (clip_l.kind, clip_g.kind, t5.kind) == ("clip", "clip", "t5")
    assert not clip_l.model.training and not t5.model.training
    den = load_denoiser("sd3-transformer", settings)
    assert type(den.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert den.scheduler.config.shift == 3.0
    cfg = den.transformer.config
    assert cfg.pooled_projection_dim == clip_l.model.config.projection_dim + clip_g.model.config.projection_dim
    assert cfg.joint_attention_dim == t5.model.config.d_model
    assert clip_l.model.config.hidden_size + clip_g.model.config.hidden_size <= t5.model.config.d_model
    vae = load_vae("sd3-vae", settings).vae
    assert len(vae.config.block_out_channels) == 4 and vae.config.latent_channels == 16
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (1.5305, 0.0609)


def test_building_twice_gives_identical_weights(settings: Settings) -> None:
    """Every model is seeded: two in-process builds, and the cached copy, hold the same weights."""
    a, b = tiny.build_tiny_pipeline(), tiny.build_tiny_pipeline()
    loaded = build_reference_pipeline(settings)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"):
        sa, sb, sl = (getattr(p, name).state_dict() for p in (a, b, loaded))
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (name, k)
            assert torch.equal(sa[k], sl[k]), (name, k)


def test_build_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    tiny._build_vae(tiny.SEEDS["sd3-vae"])
    assert torch.equal(torch.rand(4), expected)


def test_cache_is_reused(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    root = ensure_tiny_models(settings)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}

    def no_rebuild() -> None:
        raise AssertionError("rebuilt although the cache exists")

    monkeypatch.setattr(tiny, "build_tiny_pipeline", no_rebuild)
    assert ensure_tiny_models(settings) == root
    assert models_root(settings) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_concurrent_processes_build_one_identical_cache(settings: Settings, tmp_path: Path) -> None:
    """Two processes starting at once into an empty cache: both succeed, same weights as here."""
    code = (
        "import sys; from shared.settings import Settings; from shared.zoo import ensure_tiny_models; "
        "print(ensure_tiny_models(Settings(model_cache_dir=sys.argv[1])))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert out.strip() == str(tmp_path / tiny.TINY_DIR_NAME)
    assert [p.name for p in tmp_path.iterdir()] == [tiny.TINY_DIR_NAME]
    other, mine = _weights(tmp_path / tiny.TINY_DIR_NAME), _weights(ensure_tiny_models(settings))
    assert other.keys() == mine.keys() and len(mine) == 5
    for f in mine:
        for k in mine[f]:
            assert torch.equal(mine[f][k], other[f][k]), (f, k)


def test_models_dir_overrides_cache(settings: Settings, tmp_path: Path) -> None:
    root = ensure_tiny_models(settings)
    user = Settings(models_dir=str(root), model_cache_dir=str(tmp_path / "unused"))
    assert models_root(user) == root
    assert load_vae("sd3-vae", user).vae.config.latent_channels == 16
    assert not (tmp_path / "unused").exists()  # nothing built when a models dir is given
    with pytest.raises(FileNotFoundError):
        models_root(Settings(models_dir=str(tmp_path)))


ODD_PROMPTS = [
    "",
    "a cat 🐱🚀 on the moon",
    "héllo wörld, 日本語のテキスト, مرحبا",
    "tabs\tand\nnewlines\r\n   and    spaces",
    "\x00\x01 control chars \u200b zero width",
    "UPPER lower MiXeD 12345 !@#$%^&*()",
    "a very long prompt " * 200,
]


@pytest.mark.parametrize("model_id", ["clip-l", "clip-g", "t5"])
def test_tokenizers_handle_odd_input(settings: Settings, model_id: str) -> None:
    from services.encoder.model import encode

    bundle = load_text_encoder(model_id, settings)
    tok = bundle.tokenizer
    length = 77 if bundle.kind == "clip" else 256
    for text in ODD_PROMPTS:
        ids = tok([text], padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        assert ids.shape == (1, length)
        assert int(ids.max()) < bundle.model.config.vocab_size
        if bundle.kind == "clip":
            assert ids[0, 0] == tok.bos_token_id and tok.eos_token_id in ids[0].tolist()
        else:
            assert tok.eos_token_id in ids[0].tolist()
    out = encode(bundle, ODD_PROMPTS)
    assert out["embeds"].shape[:2] == (len(ODD_PROMPTS), length)
    assert torch.isfinite(out["embeds"]).all()
    if bundle.kind == "clip":
        assert out["pooled"].shape == (len(ODD_PROMPTS), bundle.model.config.projection_dim)
    # Common words are whole tokens, not one token per character.
    assert len(tok("a photo of a cat").input_ids) <= 8


def test_transformer_accepts_1024px(settings: Settings) -> None:
    """pos_embed_max_size must cover a 1024x1024 image: 128 latent / patch 2 = 64 positions a side."""
    den = load_denoiser("sd3-transformer", settings)
    cfg = den.transformer.config
    assert cfg.pos_embed_max_size * cfg.patch_size * 8 >= 1024
    with torch.inference_mode():
        out = den.transformer(
            hidden_states=torch.zeros(1, 16, 128, 128),
            timestep=torch.tensor([500.0]),
            encoder_hidden_states=torch.zeros(1, 77 + 8, cfg.joint_attention_dim),
            pooled_projections=torch.zeros(1, cfg.pooled_projection_dim),
            return_dict=False,
        )[0]
    assert out.shape == (1, 16, 128, 128)
