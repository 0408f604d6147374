"""The model zoo: ids, errors, deterministic weights, the on-disk cache, tokenizers, the
models_dir layout of real weights."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the hub

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from baseline.pipelines import build_reference_pipeline
from shared.settings import Settings
from shared.zoo import (
    MODEL_IDS,
    controlnet_dir,
    ensure_tiny_models,
    family_dir,
    load_controlnet,
    load_denoiser,
    load_model,
    load_text_encoder,
    load_vae,
    lora_path,
    models_root,
    prepare_zoo,
    registry,
    shared_dir,
    tiny,
    tiny_controlnets,
    tiny_flux,
    tiny_loras,
    tiny_sd15,
    tiny_sd35,
    tiny_sdxl,
)
from shared.zoo.families import FAMILIES
from shared.zoo.tokenizers import build_clip_tokenizer

REPO = Path(__file__).resolve().parents[2]
# The `settings` fixture (tests/conftest.py) is the session's model cache, built once.


def _weights(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(p.relative_to(root)): load_file(p) for p in sorted(root.rglob("*.safetensors"))}


def test_model_ids() -> None:
    assert MODEL_IDS == registry.MODEL_IDS
    assert {"clip-l", "clip-g", "t5", "sd3-transformer", "sd3-vae"} < set(MODEL_IDS) and len(MODEL_IDS) == 16
    assert all(m.replace("-", "").isalnum() for m in MODEL_IDS)  # safe as a NATS subject token


def test_unknown_id_names_known_ids(settings: Settings) -> None:
    with pytest.raises(ValueError, match="clip-l"):
        load_model("sd2-unet", settings)
    with pytest.raises(ValueError, match="sd3-transformer"):
        load_denoiser("clip-l", settings)
    with pytest.raises(ValueError, match="t5"):
        load_text_encoder("sd3-vae", settings)
    with pytest.raises(ValueError, match="sd3-vae"):
        load_vae("t5", settings)
    with pytest.raises(ValueError, match="flux-controlnet"):
        load_controlnet("flux-transformer", settings)
    with pytest.raises(ValueError, match="flux-lora-a"):
        lora_path("flux-lora-c", settings)


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
    tiny.build_vae(tiny.SEEDS["sd3-vae"])
    tiny_controlnets.build_controlnet("flux-controlnet")
    tiny_loras.build_lora_state_dict("sd35-large-lora-b")
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
    # The tokenizers too (other processes, other hash seeds: a prompt must tokenize alike everywhere).
    for sub in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        for f in sorted((ensure_tiny_models(settings) / sub).iterdir()):
            assert f.read_bytes() == (tmp_path / tiny.TINY_DIR_NAME / sub / f.name).read_bytes(), f


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


def test_every_model_id_loads(settings: Settings) -> None:
    """Each id loads as its real diffusers/transformers class, sized to take the shared encoders."""
    bundles = {m: load_model(m, settings) for m in MODEL_IDS}
    clip_l, t5 = bundles["clip-l"].model.config, bundles["t5"].model.config
    expected = {
        "sd3-transformer": "SD3Transformer2DModel",
        "sd35-large-transformer": "SD3Transformer2DModel",
        "flux-transformer": "FluxTransformer2DModel",
        "sd3-controlnet": "SD3ControlNetModel",
        "sd35-large-controlnet": "SD3ControlNetModel",
        "flux-controlnet": "FluxControlNetModel",
        "sd15-unet": "UNet2DConditionModel",
        "sdxl-unet": "UNet2DConditionModel",
    }
    for model_id, cls in expected.items():
        model = getattr(bundles[model_id], "transformer", None) or bundles[model_id].controlnet
        assert type(model).__name__ == cls, model_id
        assert not model.training
        assert bundles[model_id].family == registry.family_of(model_id)

    sd35 = bundles["sd35-large-transformer"].transformer.config
    sd3 = bundles["sd3-transformer"].transformer.config
    assert sd35.qk_norm == "rms_norm" and not sd35.dual_attention_layers and sd3.qk_norm is None
    assert (sd35.joint_attention_dim, sd35.pooled_projection_dim) == (
        sd3.joint_attention_dim,
        sd3.pooled_projection_dim,
    )

    flux = bundles["flux-transformer"]
    cfg = flux.transformer.config
    assert cfg.guidance_embeds and cfg.in_channels == 64 and sum(cfg.axes_dims_rope) == cfg.attention_head_dim
    assert cfg.joint_attention_dim == t5.d_model and cfg.pooled_projection_dim == clip_l.hidden_size
    sched = flux.scheduler.config
    assert sched.use_dynamic_shifting and (sched.base_shift, sched.max_shift) == (0.5, 1.15)
    assert (sched.base_image_seq_len, sched.max_image_seq_len) == (256, 4096)
    assert bundles["sd35-large-transformer"].scheduler.config.shift == 3.0

    vae = bundles["flux-vae"].vae.config
    assert (vae.scaling_factor, vae.shift_factor, vae.latent_channels) == (0.3611, 0.1159, 16)
    assert len(vae.block_out_channels) == 4

    # SD1.5: its own CLIPTextModel (no projection) as wide as the UNet's cross-attention, PNDM.
    sd15 = bundles["sd15-unet"]
    assert type(bundles["sd15-clip"].model).__name__ == "CLIPTextModel"
    assert sd15.transformer.config.cross_attention_dim == bundles["sd15-clip"].model.config.hidden_size
    assert type(sd15.scheduler).__name__ == "PNDMScheduler" and sd15.scheduler.config.skip_prk_steps
    vae = bundles["sd15-vae"].vae.config
    assert (vae.scaling_factor, vae.shift_factor, vae.latent_channels) == (0.18215, None, 4)

    # SDXL: the shared CLIP-L and CLIP-G, side by side on channels and CLIP-G's pool + 6 time ids, Euler.
    sdxl, clip_g = bundles["sdxl-unet"], bundles["clip-g"].model.config
    unet = sdxl.transformer.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == clip_l.hidden_size + clip_g.hidden_size
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + clip_g.projection_dim
    assert type(sdxl.scheduler).__name__ == "EulerDiscreteScheduler" and sdxl.force_zeros_for_empty_prompt
    vae = bundles["sdxl-vae"].vae.config
    assert (vae.scaling_factor, vae.shift_factor, vae.latent_channels, vae.force_upcast) == (0.13025, None, 4, True)

    for model_id in ("sd3-controlnet", "sd35-large-controlnet", "flux-controlnet"):
        cn = bundles[model_id].controlnet
        assert cn.config.num_layers == 1
        outputs = [*cn.controlnet_blocks, *getattr(cn, "controlnet_single_blocks", [])]
        inputs = cn.controlnet_x_embedder if model_id == "flux-controlnet" else cn.pos_embed_input.proj
        for layer in [*outputs, inputs]:  # zero-initialised by diffusers: re-seeded here
            assert layer.weight.abs().sum() > 0, model_id
    shifted = {name: d.control_latents_shifted for name, d in FAMILIES.items()}
    assert bundles["sd3-controlnet"].controlnet.config.force_zeros_for_pooled_projection == (not shifted["sd3"])
    assert bundles["sd35-large-controlnet"].controlnet.config.force_zeros_for_pooled_projection == (
        not shifted["sd35-large"]
    )


def test_new_models_are_deterministic_and_cached_as_built(settings: Settings) -> None:
    def same(a: dict, b: dict, what: str) -> None:
        assert a.keys() == b.keys(), what
        for k in a:
            assert torch.equal(a[k], b[k]), (what, k)

    prepare_zoo(settings)
    builds = {
        "sd35-large transformer": (tiny_sd35.build_transformer, family_dir("sd35-large", settings) / "transformer"),
        "flux transformer": (tiny_flux.build_transformer, family_dir("flux", settings) / "transformer"),
        "flux vae": (tiny_flux.build_flux_vae, family_dir("flux", settings) / "vae"),
        "sd15 unet": (tiny_sd15.build_unet, family_dir("sd15", settings) / "unet"),
        "sd15 vae": (tiny_sd15.build_sd15_vae, family_dir("sd15", settings) / "vae"),
        "sdxl unet": (tiny_sdxl.build_unet, family_dir("sdxl", settings) / "unet"),
        "sdxl vae": (tiny_sdxl.build_sdxl_vae, family_dir("sdxl", settings) / "vae"),
        "sd15 clip": (
            lambda: tiny_sd15.build_text_encoder(build_clip_tokenizer()),
            family_dir("sd15", settings) / "text_encoder",
        ),
    }
    for cn in tiny_controlnets.SEEDS:
        builds[cn] = (lambda cn=cn: tiny_controlnets.build_controlnet(cn), controlnet_dir(cn, settings))
    for what, (build, path) in builds.items():
        first = build().state_dict()
        same(first, build().state_dict(), what)
        [file] = path.glob("*.safetensors")
        same(first, load_file(file), what)
    for name in tiny_loras.SEEDS:
        built = {f"transformer.{k}": v for k, v in tiny_loras.build_lora_state_dict(name).items()}
        same(built, load_file(lora_path(name, settings) / tiny_loras.WEIGHT_NAME), name)
        assert len(built) > 0 and all(".lora_A." in k or ".lora_B." in k for k in built)


def test_python_m_shared_zoo_builds_everything(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "LEGO_MODEL_CACHE_DIR": str(tmp_path)}
    env.pop("LEGO_MODELS_DIR", None)
    done = subprocess.run(
        [sys.executable, "-m", "shared.zoo"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    names = {"tiny-sd3-v1", "tiny-sd35-large-v1", "tiny-flux-v1", "tiny-sd15-v1", "tiny-sdxl-v1"}
    names |= {"tiny-controlnets-v1", "tiny-loras-v1"}
    assert {p.name for p in tmp_path.iterdir()} == names  # and no temporary directory left behind
    assert {p.name for p in (tmp_path / "tiny-controlnets-v1").iterdir()} == set(tiny_controlnets.SEEDS)
    assert {p.name for p in (tmp_path / "tiny-loras-v1").iterdir()} == set(registry.LORAS)
    for d in [
        *tmp_path.iterdir(),
        *(tmp_path / "tiny-controlnets-v1").iterdir(),
        *(tmp_path / "tiny-loras-v1").iterdir(),
    ]:
        assert tiny.is_built(d) or d.name in ("tiny-controlnets-v1", "tiny-loras-v1"), d
    for name in registry.LORAS:
        assert (tmp_path / "tiny-loras-v1" / name / tiny_loras.WEIGHT_NAME).is_file()
    assert "flux-lora-b" in done.stdout


def _link_layout(
    settings: Settings, root: Path, families=("sd3", "sd35-large", "flux", "sd15", "sdxl"), controlnets=(), loras=()
):
    """A models_dir in the documented layout, made of links to the tiny models."""
    root.mkdir(parents=True, exist_ok=True)
    for f in families:
        (root / f).symlink_to(family_dir(f, settings))
    for c in controlnets:
        (root / "controlnets").mkdir(exist_ok=True)
        (root / "controlnets" / c).symlink_to(controlnet_dir(c, settings))
    for n in loras:
        (root / "loras").mkdir(exist_ok=True)
        (root / "loras" / n).symlink_to(lora_path(n, settings))
    return Settings(models_dir=str(root), model_cache_dir=str(root.parent / "unused-cache"))


def test_models_dir_layout(settings: Settings, tmp_path: Path) -> None:
    """<models_dir>/{sd3,sd35-large,flux,sd15,sdxl,controlnets/<id>,loras/<name>} load the same weights."""
    prepare_zoo(settings)
    user = _link_layout(
        settings, tmp_path / "models", controlnets=tiny_controlnets.SEEDS, loras=["flux-lora-a", "sd3-lora-b"]
    )
    assert shared_dir(user) == tmp_path / "models" / "sd3" and models_root(user) == tmp_path / "models" / "sd3"
    for model_id in MODEL_IDS:
        mine, cached = load_model(model_id, user), load_model(model_id, settings)
        a = getattr(mine, "model", None) or getattr(mine, "transformer", None) or getattr(mine, "vae", None)
        b = getattr(cached, "model", None) or getattr(cached, "transformer", None) or getattr(cached, "vae", None)
        a, b = (a, b) if a is not None else (mine.controlnet, cached.controlnet)
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sb), model_id
    assert lora_path("flux-lora-a", user) == tmp_path / "models" / "loras" / "flux-lora-a"
    assert not (tmp_path / "unused-cache").exists()  # nothing built when a models dir is given

    # A LoRA may also be a bare file <models_dir>/loras/<name>.safetensors.
    (tmp_path / "models" / "loras" / "sd3-lora-a.safetensors").symlink_to(
        lora_path("sd3-lora-a", settings) / tiny_loras.WEIGHT_NAME
    )
    assert lora_path("sd3-lora-a", user).name == "sd3-lora-a.safetensors"

    # Without sd3, the shared encoders and sd3-vae come from a full sd35-large directory.
    sd35 = tmp_path / "models35" / "sd35-large"
    sd35.mkdir(parents=True)
    for sub in ("transformer", "scheduler"):
        (sd35 / sub).symlink_to(family_dir("sd35-large", settings) / sub)
    for sub in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3", "vae"):
        (sd35 / sub).symlink_to(shared_dir(settings) / sub)
    only35 = Settings(models_dir=str(tmp_path / "models35"))
    assert shared_dir(only35) == sd35
    assert load_text_encoder("clip-g", only35).kind == "clip" and load_vae("sd3-vae", only35).vae is not None
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "models35" / "sd3")):
        load_denoiser("sd3-transformer", only35)


def test_models_dir_errors_name_the_missing_path(settings: Settings, tmp_path: Path) -> None:
    user = _link_layout(settings, tmp_path / "models", families=("sd3",))
    root = tmp_path / "models"
    with pytest.raises(FileNotFoundError, match=str(root / "flux")):
        load_denoiser("flux-transformer", user)
    with pytest.raises(FileNotFoundError, match=str(root / "flux")):
        load_vae("flux-vae", user)
    with pytest.raises(FileNotFoundError, match=str(root / "sd35-large")):
        load_denoiser("sd35-large-transformer", user)
    with pytest.raises(FileNotFoundError, match=str(root / "controlnets" / "sd3-controlnet")):
        load_controlnet("sd3-controlnet", user)
    with pytest.raises(FileNotFoundError, match=str(root / "loras" / "sd3-lora-a")):
        lora_path("sd3-lora-a", user)
    assert load_text_encoder("t5", user).kind == "t5"  # what is there still loads
    assert set(prepare_zoo(user)) == {"shared", "sd3"}  # `python -m shared.zoo` lists what it found

    empty = Settings(models_dir=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty" / "sd3" / "text_encoder")):
        load_text_encoder("clip-l", empty)

    # Today's layout: models_dir is itself an SD3 directory; other families are looked up inside it.
    legacy = Settings(models_dir=str(ensure_tiny_models(settings)), model_cache_dir=str(tmp_path / "unused"))
    assert load_denoiser("sd3-transformer", legacy).family == "sd3"
    with pytest.raises(FileNotFoundError, match=str(ensure_tiny_models(settings) / "flux")):
        load_denoiser("flux-transformer", legacy)


def test_controlnet_that_breaks_the_family_rule_is_refused(settings: Settings, tmp_path: Path) -> None:
    """An SD3 ControlNet wanting the pooled prompt would need shifted control latents, which the
    VAE service does not make for sd3: refuse it at load rather than draw a wrong image."""
    import json
    import shutil

    root = tmp_path / "models"
    user = _link_layout(settings, root, families=("sd3",))
    target = root / "controlnets" / "sd3-controlnet"
    shutil.copytree(controlnet_dir("sd3-controlnet", settings), target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(config | {"force_zeros_for_pooled_projection": False}))
    with pytest.raises(ValueError, match="force_zeros_for_pooled_projection"):
        load_controlnet("sd3-controlnet", user)
