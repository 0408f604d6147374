"""The oracle for the sd15 workflow, in-process: the services' compute functions chained as the
mesh chains them (`sd15-clip` on [prompt, negative_prompt] for its last hidden state, the UNet
loop, the VAE decode) equal diffusers' own `StableDiffusionPipeline` over the same directory,
bit for bit; and two requests batched into shared UNet calls each get (up to rounding) their own
image, although their PNDM schedulers keep state step to step.
"""

from __future__ import annotations

import dataclasses
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the hub

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from baseline.pipelines import build_reference_pipeline
from services.denoiser.denoise import denoise, denoise_loop, warm_up_inputs
from services.denoiser.loop import ControlSpec, DenoiseInputs
from services.encoder.model import encode
from services.vae.model import decode
from shared.settings import Settings
from shared.zoo import load_denoiser, load_text_encoder, load_vae
from tests.engine import assert_batched_like_alone
from tests.oracle import reference_images


@dataclass
class Sd15:
    encoder: object
    denoiser: object
    vae: object
    pipe: object


@pytest.fixture(scope="module")
def sd15(settings: Settings) -> Sd15:
    return Sd15(
        encoder=load_text_encoder("sd15-clip", settings),
        denoiser=load_denoiser("sd15-unet", settings),
        vae=load_vae("sd15-vae", settings),
        pipe=build_reference_pipeline(settings, family="sd15"),
    )


def test_the_zoo_holds_sd15_as_published(sd15: Sd15) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    assert type(sd15.encoder.model) is CLIPTextModel
    assert type(sd15.denoiser.transformer) is UNet2DConditionModel
    assert type(sd15.denoiser.scheduler) is PNDMScheduler and sd15.denoiser.scheduler.config.skip_prk_steps
    assert type(sd15.vae.vae) is AutoencoderKL
    vae = sd15.vae.vae.config
    assert vae.latent_channels == 4 and vae.scaling_factor == 0.18215 and vae.shift_factor is None
    unet = sd15.denoiser.transformer.config
    assert unet.cross_attention_dim == sd15.encoder.model.config.hidden_size and unet.in_channels == 4
    assert type(sd15.pipe) is StableDiffusionPipeline and sd15.pipe.safety_checker is None


def mesh_latents(sd15: Sd15, prompt: str, negative: str, num_images: int = 1, **kw) -> torch.Tensor:
    embeds = encode(sd15.encoder, [prompt, negative], outputs=("last",))["last"]
    return denoise(sd15.denoiser, DenoiseInputs({"clip_embeds": embeds}, n=num_images, **kw))


CASES = [
    pytest.param("a photo of a cat on a chair", "", 64, 64, 1, 4, 7.5, 0, id="64x64-cfg7.5"),
    pytest.param("portrait of a woman", "blurry, low quality", 96, 64, 2, 3, 4.5, 3, id="96x64-n2-negative"),
    pytest.param("a castle on a hill", "", 64, 128, 1, 3, 1.0, 7, id="no-cfg-guidance1"),
    pytest.param("a red car in the rain", "watermark", 72, 56, 1, 2, 0.5, 11, id="72x56-guidance-below-1"),
]


@pytest.mark.parametrize("prompt,negative,height,width,n,steps,guidance,seed", CASES)
def test_sd15_chain_equals_pipeline(sd15: Sd15, prompt, negative, height, width, n, steps, guidance, seed) -> None:
    kw = {"height": height, "width": width, "num_inference_steps": steps, "guidance_scale": guidance, "seed": seed}
    progress: list[tuple[int, int]] = []
    latents = mesh_latents(sd15, prompt, negative, num_images=n, on_step=lambda i, t: progress.append((i, t)), **kw)
    assert progress == [(i, steps) for i in range(1, steps + 1)]  # as the pipeline's progress bar
    pixels = decode(sd15.vae, latents)
    assert pixels.dtype == torch.uint8 and pixels.shape == (n, height, width, 3)

    want = reference_images(
        sd15.pipe,
        prompt=prompt,
        negative_prompt=negative,
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        seed=seed,
        n=n,
    )
    ref = np.stack([np.asarray(im.convert("RGB")) for im in want])
    assert np.array_equal(pixels.numpy(), ref), f"max diff {np.abs(pixels.numpy().astype(int) - ref).max()}"
    assert pixels.float().std() > 5  # not trivially flat


def test_guidance_uses_the_negative_prompt_only_above_1(sd15: Sd15) -> None:
    kw = {"height": 64, "width": 64, "num_inference_steps": 2, "seed": 5}
    a = mesh_latents(sd15, "a boat on a lake", "", guidance_scale=1.0, **kw)
    b = mesh_latents(sd15, "a boat on a lake", "fog", guidance_scale=1.0, **kw)
    c = mesh_latents(sd15, "a boat on a lake", "fog", guidance_scale=7.5, **kw)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_batched_requests_share_unet_calls_and_keep_their_own_schedulers(settings: Settings) -> None:
    """Two requests of one size but other seeds, prompts, guidance and step counts (so other
    timesteps at each shared call) run in one engine: each ends where it ends alone. In float32
    whatever the device: in bf16 a batched call's kernels round differently from a solo call's
    (0.2 apart after a few steps on an H100), which says nothing about the schedulers."""
    fp32 = dataclasses.replace(settings, dtype="float32")
    encoder, denoiser = load_text_encoder("sd15-clip", fp32), load_denoiser("sd15-unet", fp32)
    requests = [
        ("a bowl of fruit", 7.5, 3, 1),
        ("a city at night", 5.0, 4, 2),
    ]
    cases = []
    for prompt, guidance, steps, seed in requests:
        embeds = encode(encoder, [prompt, ""], outputs=("last",))["last"]
        kw = {"height": 64, "width": 64, "num_inference_steps": steps, "guidance_scale": guidance, "seed": seed}
        cases.append(({"clip_embeds": embeds}, kw))
    assert_batched_like_alone(denoiser, cases)


def test_warm_up_inputs_fit_the_unet(sd15: Sd15) -> None:
    kw = {"height": 64, "width": 64, "num_inference_steps": 2, "guidance_scale": 5.0, "seed": 0}
    latents = denoise(sd15.denoiser, DenoiseInputs(warm_up_inputs(sd15.denoiser), **kw))
    assert latents.shape == (1, 4, 8, 8)


def test_sd15_refuses_what_it_cannot_take(sd15: Sd15, settings: Settings) -> None:
    embeds = torch.zeros(2, 77, sd15.denoiser.transformer.config.cross_attention_dim)
    kw = {"num_inference_steps": 2, "guidance_scale": 5.0, "seed": 0}
    with pytest.raises(ValueError, match="multiples of 8"):
        denoise_loop(sd15.denoiser, DenoiseInputs({"clip_embeds": embeds}, height=60, width=64, **kw))
    with pytest.raises(ValueError, match="clip_embeds"):
        denoise_loop(sd15.denoiser, DenoiseInputs({"clip_l_embeds": embeds}, height=64, width=64, **kw))
    control = ControlSpec(torch.zeros(2, 4, 8, 8), 1.0, lambda c, v, p: {})
    with pytest.raises(ValueError, match="takes no ControlNet"):
        denoise_loop(sd15.denoiser, DenoiseInputs({"clip_embeds": embeds}, height=64, width=64, control=control, **kw))
    with pytest.raises(ValueError, match="no ControlNet"):
        build_reference_pipeline(settings, family="sd15", controlnet=True)
