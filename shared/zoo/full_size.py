"""The full-size architectures of every model id, built on torch's `meta` device (no memory).

Why: no real weights can be downloaded here, yet memory claims must hold for the real models.
These are the published configs (SD3-Medium, SD3.5-Large, Flux.1-dev, SD1.5, SDXL-base, their text
encoders, VAEs and public ControlNets), instantiated as the same diffusers/transformers classes the
services load, so parameter counts are exact; on a GPU they can be materialised with random
weights (`device="cuda"`) to time the real shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# GiB of bf16 parameters of each base model's full-size config, as `build_full_size` counts them
# (tests/unit/test_full_size.py checks it): for scripts that need the figures without torch.
PARAM_GIB = {
    "clip-l": 0.23,
    "clip-g": 1.29,
    "t5": 8.87,
    "sd3-transformer": 3.78,
    "sd35-large-transformer": 15.01,
    "flux-transformer": 22.17,
    "sd3-vae": 0.16,
    "flux-vae": 0.16,
    "sd15-clip": 0.23,
    "sd15-unet": 1.60,
    "sd15-vae": 0.16,
    "sdxl-unet": 4.78,
    "sdxl-vae": 0.16,
}
LORA_RANK = 16  # a typical rank for style LoRAs of these bases
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
BYTES_PER_PARAM = 2  # bf16, as these models are served


def _clip(hidden: int, intermediate: int, layers: int, heads: int, projection: bool = True, **token_ids: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=intermediate,
        projection_dim=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act="gelu",
        **token_ids,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(layers: int = 24, **token_ids: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=layers,
        num_heads=64,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        **token_ids,
    )
    return T5EncoderModel(config)


def _sd3_config(layers: int, heads: int, caption_dim: int, qk_norm: str | None) -> dict[str, Any]:
    """SD3-family MMDiT widths; the transformer and its ControlNets share them."""
    return {
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": layers,
        "attention_head_dim": 64,
        "num_attention_heads": heads,
        "joint_attention_dim": 4096,
        "caption_projection_dim": caption_dim,
        "pooled_projection_dim": 2048,
        "out_channels": 16,
        "pos_embed_max_size": 192,
        "qk_norm": qk_norm,
    }


def _sd3_transformer(layers: int, heads: int, caption_dim: int, qk_norm: str | None) -> Any:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**_sd3_config(layers, heads, caption_dim, qk_norm))


def _sd3_controlnet(layers: int, heads: int, caption_dim: int, qk_norm: str | None) -> Any:
    from diffusers import SD3ControlNetModel

    return SD3ControlNetModel(**_sd3_config(layers, heads, caption_dim, qk_norm))


def _flux_config(layers: int, single_layers: int) -> dict[str, Any]:
    return {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": layers,
        "num_single_layers": single_layers,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
        "axes_dims_rope": (16, 56, 56),
    }


def _flux_transformer() -> Any:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**_flux_config(19, 38))


def _flux_controlnet() -> Any:
    from diffusers import FluxControlNetModel

    # InstantX/FLUX.1-dev-Controlnet-Canny: 5 double and 10 single blocks.
    return FluxControlNetModel(**_flux_config(5, 10))


def _vae(scaling: float, shift: float | None, latent_channels: int = 16) -> Any:
    """SD3's and Flux's 16-channel VAE; with 4 channels (and quant convs) SD1.5's and SDXL's."""
    from diffusers import AutoencoderKL

    quant = latent_channels == 4
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=latent_channels,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=quant,
        use_post_quant_conv=quant,
    )


def _sd15_unet() -> Any:
    """stable-diffusion-v1-5's unet/config.json."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def _sdxl_unet() -> Any:
    """stable-diffusion-xl-base-1.0's unet/config.json."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,  # CLIP-L 768 + OpenCLIP bigG 1280
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + bigG's 1280 projection
    )


_BUILDERS = {
    "clip-l": lambda: _clip(768, 3072, 12, 12),
    "clip-g": lambda: _clip(1280, 5120, 32, 20),
    "t5": _t5,
    "sd3-transformer": lambda: _sd3_transformer(24, 24, 1536, None),  # SD3-Medium
    "sd35-large-transformer": lambda: _sd3_transformer(38, 38, 2432, "rms_norm"),
    "flux-transformer": _flux_transformer,
    "sd3-vae": lambda: _vae(1.5305, 0.0609),
    "flux-vae": lambda: _vae(0.3611, 0.1159),
    # InstantX/SD3-Controlnet-Canny: 6 joint blocks of SD3-Medium's width.
    "sd3-controlnet": lambda: _sd3_controlnet(6, 24, 1536, None),
    # stabilityai/stable-diffusion-3.5-large-controlnet-*: 19 blocks of SD3.5-Large's width.
    "sd35-large-controlnet": lambda: _sd3_controlnet(19, 38, 2432, "rms_norm"),
    "flux-controlnet": _flux_controlnet,
    "sd15-clip": lambda: _clip(768, 3072, 12, 12, projection=False),
    "sd15-unet": _sd15_unet,
    "sd15-vae": lambda: _vae(0.18215, None, latent_channels=4),
    "sdxl-unet": _sdxl_unet,
    "sdxl-vae": lambda: _vae(0.13025, None, latent_channels=4),
}


def build_full_size(model_id: str, device: str = "meta") -> Any:
    """The full-size model of `model_id` on `device` ("meta": shapes only, no memory)."""
    import torch

    if model_id not in _BUILDERS:
        raise ValueError(f"no full-size config for {model_id!r}; known: {', '.join(_BUILDERS)}")
    with torch.device(device):
        return _BUILDERS[model_id]().eval()


def parameter_count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_parameter_count(base: Any, rank: int = LORA_RANK) -> int:
    """Parameters of a rank-`rank` LoRA on the base's attention projections (A: r x in, B: out x r)."""
    import torch

    total = 0
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in LORA_TARGETS):
            total += rank * (module.in_features + module.out_features)
    return total


FULL_SIZE_SD3_DIR = "full-size-sd3-medium-v1"


def write_full_size_sd3(directory: Path, device: str = "cpu", dtype: str = "bfloat16", max_layers: int = 0) -> Path:
    """An SD3-Medium diffusers directory with the published architecture and random weights.

    Why: no weights can be downloaded, but the mesh's overhead must be measured at the real
    shapes (333 text tokens, a 2 B MMDiT over 4096 image tokens at 1024 px, T5-XXL). The
    tokenizers, scheduler and model_index.json are the tiny zoo's (so the text encoders see
    the tiny vocabulary's ids, which their 49408/32128-row embeddings hold); every model is
    replaced by its full-size twin, built on `device` one at a time (seeded) and saved in
    `dtype`. `max_layers` > 0 caps every stack's depth, widths unchanged: a quick smoke run of
    the same code on a CPU. The directory is written once (see `build_once`) and then reused.
    """
    import shutil

    import torch

    from shared.zoo.tiny import build_once, build_tiny_pipeline

    def depth(n: int) -> int:
        return min(n, max_layers) if max_layers > 0 else n

    def build(tmp: Path) -> None:
        tiny = build_tiny_pipeline()
        tiny.save_pretrained(tmp, safe_serialization=True)  # tokenizers, scheduler, model_index.json
        clip_ids = {k: getattr(tiny.tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        t5_ids = {k: getattr(tiny.tokenizer_3, k) for k in ("eos_token_id", "pad_token_id")}
        models: dict[str, Any] = {
            "text_encoder": lambda: _clip(768, 3072, depth(12), 12, **clip_ids),  # CLIP ViT-L/14
            "text_encoder_2": lambda: _clip(1280, 5120, depth(32), 20, **clip_ids),  # OpenCLIP bigG/14
            "text_encoder_3": lambda: _t5(depth(24), **t5_ids),  # T5 v1.1 XXL
            "transformer": lambda: _sd3_transformer(depth(24), 24, 1536, None),  # SD3-Medium MMDiT
            "vae": lambda: _vae(1.5305, 0.0609),
        }
        for seed, (sub, make) in enumerate(models.items()):
            torch.manual_seed(seed)
            with torch.device(device):
                model = make().eval()
            model = model.to(getattr(torch, dtype))
            shutil.rmtree(tmp / sub)
            model.save_pretrained(tmp / sub, safe_serialization=True)
            del model
            if device.startswith("cuda"):
                torch.cuda.empty_cache()

    info = {"name": FULL_SIZE_SD3_DIR, "dtype": dtype, "max_layers": max_layers, "weights": "random"}
    return build_once(Path(directory), build, info)
