"""The oracle for the sdxl workflow, in-process: the services' compute functions chained as the
mesh chains them (the shared `clip-l` for its penultimate hidden state, the shared `clip-g` for
its penultimate hidden state and projected pool, each on [prompt, negative_prompt], the UNet
loop with SDXL's added conditions, the VAE decode) equal diffusers' own
`StableDiffusionXLPipeline` over the same directories, bit for bit; an empty negative prompt
gives zero negative embeddings as the pipeline's `negative_prompt=None` does; and two requests
batched into shared UNet calls each get (up to rounding) their own image.
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
from services.denoiser.loop import DenoiseInputs
from services.encoder.model import encode
from services.vae.model import decode
from shared.settings import Settings
from shared.zoo import load_denoiser, load_text_encoder, load_vae
from tests.engine import assert_batched_like_alone
from tests.oracle import reference_images


@dataclass
class Sdxl:
    clip_l: object
    clip_g: object
    denoiser: object
    vae: object
    pipe: object


@pytest.fixture(scope="module")
def sdxl(settings: Settings) -> Sdxl:
    return Sdxl(
        clip_l=load_text_encoder("clip-l", settings),
        clip_g=load_text_encoder("clip-g", settings),
        denoiser=load_denoiser("sdxl-unet", settings),
        vae=load_vae("sdxl-vae", settings),
        pipe=build_reference_pipeline(settings, family="sdxl"),
    )


def test_the_zoo_holds_sdxl_as_published(sdxl: Sdxl) -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    assert type(sdxl.denoiser.transformer) is UNet2DConditionModel
    assert type(sdxl.denoiser.scheduler) is EulerDiscreteScheduler
    assert sdxl.denoiser.scheduler.config.timestep_spacing == "leading" and sdxl.denoiser.force_zeros_for_empty_prompt
    vae = sdxl.vae.vae.config
    assert type(sdxl.vae.vae) is AutoencoderKL
    assert vae.latent_channels == 4 and vae.scaling_factor == 0.13025 and vae.shift_factor is None and vae.force_upcast
    unet = sdxl.denoiser.transformer.config
    widths = sdxl.clip_l.model.config.hidden_size + sdxl.clip_g.model.config.hidden_size
    assert unet.addition_embed_type == "text_time" and unet.cross_attention_dim == widths
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + (
        sdxl.clip_g.model.config.projection_dim
    )
    assert type(sdxl.pipe) is StableDiffusionXLPipeline and sdxl.pipe.watermark is None
    # the pipeline's CLIPTextModel reads the very weights the shared clip-l serves
    for pipe_model, served in (
        (sdxl.pipe.text_encoder, sdxl.clip_l.model),
        (sdxl.pipe.text_encoder_2, sdxl.clip_g.model),
    ):
        mine = getattr(pipe_model, "text_model", pipe_model).state_dict()
        theirs = getattr(served, "text_model", served).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def mesh_latents(sdxl: Sdxl, prompt: str, negative: str, num_images: int = 1, **kw) -> torch.Tensor:
    texts = [prompt, negative]
    l_out = encode(sdxl.clip_l, texts, outputs=("embeds",))
    g_out = encode(sdxl.clip_g, texts, outputs=("embeds", "pooled"))
    inputs = {"clip_l_embeds": l_out["embeds"], "clip_g_embeds": g_out["embeds"], "clip_g_pooled": g_out["pooled"]}
    return denoise(sdxl.denoiser, DenoiseInputs(inputs, n=num_images, negative_prompt=negative, **kw))


CASES = [
    pytest.param("a photo of a cat on a chair", "", 64, 64, 1, 4, 7.5, 0, id="64x64-cfg7.5-zero-negative"),
    pytest.param("portrait of a woman", "blurry, low quality", 96, 64, 2, 3, 4.5, 3, id="96x64-n2-negative"),
    pytest.param("a castle on a hill", "", 64, 128, 1, 3, 1.0, 7, id="no-cfg-guidance1"),
    pytest.param("a red car in the rain", "watermark", 72, 56, 1, 2, 0.5, 11, id="72x56-guidance-below-1"),
]


@pytest.mark.parametrize("prompt,negative,height,width,n,steps,guidance,seed", CASES)
def test_sdxl_chain_equals_pipeline(sdxl: Sdxl, prompt, negative, height, width, n, steps, guidance, seed) -> None:
    kw = {"height": height, "width": width, "num_inference_steps": steps, "guidance_scale": guidance, "seed": seed}
    progress: list[tuple[int, int]] = []
    latents = mesh_latents(sdxl, prompt, negative, num_images=n, on_step=lambda i, t: progress.append((i, t)), **kw)
    assert progress == [(i, steps) for i in range(1, steps + 1)]  # as the pipeline's progress bar
    pixels = decode(sdxl.vae, latents)
    assert pixels.dtype == torch.uint8 and pixels.shape == (n, height, width, 3)

    want = reference_images(
        sdxl.pipe,
        prompt=prompt,
        negative_prompt=negative,  # "" -> None for SDXL's pipeline (see pipeline_negative_prompt)
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


def test_an_empty_negative_prompt_gives_zero_embeddings_not_the_encoded_empty_text(sdxl: Sdxl) -> None:
    """The mesh's latents for an empty negative prompt are the pipeline's for None (zeros), not
    for "" (which the pipeline encodes); as the pipeline, the zeros apply with guidance only."""
    kw = {"height": 64, "width": 64, "num_inference_steps": 2, "guidance_scale": 5.0}
    zeros = mesh_latents(sdxl, "a boat on a lake", "", seed=5, **kw)
    call = {"prompt": "a boat on a lake", "output_type": "latent", **kw}
    for negative, equal in ((None, True), ("", False)):
        generator = torch.Generator("cpu").manual_seed(5)
        latents = sdxl.pipe(**call, negative_prompt=negative, generator=generator).images
        assert torch.equal(zeros, latents.to(zeros.device)) == equal, negative


def test_guidance_uses_the_negative_prompt_only_above_1(sdxl: Sdxl) -> None:
    kw = {"height": 64, "width": 64, "num_inference_steps": 2, "seed": 5}
    a = mesh_latents(sdxl, "a boat on a lake", "", guidance_scale=1.0, **kw)
    b = mesh_latents(sdxl, "a boat on a lake", "fog", guidance_scale=1.0, **kw)
    c = mesh_latents(sdxl, "a boat on a lake", "fog", guidance_scale=7.5, **kw)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_batched_requests_share_unet_calls_and_keep_their_own_schedulers(settings: Settings) -> None:
    """Two requests of one size but other seeds, prompts, negative prompts, guidance and step
    counts (so other timesteps at each shared call) run in one engine: each ends where it ends
    alone, its Euler scheduler and added conditions its own. In float32 whatever the device (in
    bf16 a batched call's kernels round differently from a solo call's)."""
    fp32 = dataclasses.replace(settings, dtype="float32")
    clip_l, clip_g = load_text_encoder("clip-l", fp32), load_text_encoder("clip-g", fp32)
    denoiser = load_denoiser("sdxl-unet", fp32)
    requests = [
        ("a bowl of fruit", "", 7.5, 3, 1),
        ("a city at night", "daylight", 5.0, 4, 2),
    ]
    cases = []
    for prompt, negative, guidance, steps, seed in requests:
        l_out = encode(clip_l, [prompt, negative], outputs=("embeds",))
        g_out = encode(clip_g, [prompt, negative], outputs=("embeds", "pooled"))
        inputs = {"clip_l_embeds": l_out["embeds"], "clip_g_embeds": g_out["embeds"], "clip_g_pooled": g_out["pooled"]}
        kw = {"height": 64, "width": 64, "num_inference_steps": steps, "guidance_scale": guidance, "seed": seed}
        cases.append((inputs, {**kw, "negative_prompt": negative}))
    assert_batched_like_alone(denoiser, cases)


def test_warm_up_inputs_fit_the_unet(sdxl: Sdxl) -> None:
    kw = {"height": 64, "width": 64, "num_inference_steps": 2, "guidance_scale": 5.0, "seed": 0}
    latents = denoise(sdxl.denoiser, DenoiseInputs(warm_up_inputs(sdxl.denoiser), **kw))
    assert latents.shape == (1, 4, 8, 8)


def test_sdxl_refuses_what_it_cannot_take(sdxl: Sdxl, settings: Settings) -> None:
    inputs = warm_up_inputs(sdxl.denoiser)
    kw = {"num_inference_steps": 2, "guidance_scale": 5.0, "seed": 0}
    with pytest.raises(ValueError, match="multiples of 8"):
        denoise_loop(sdxl.denoiser, DenoiseInputs(inputs, height=60, width=64, **kw))
    with pytest.raises(ValueError, match="clip_g_pooled"):
        denoise_loop(sdxl.denoiser, DenoiseInputs({"clip_embeds": inputs["clip_l_embeds"]}, height=64, width=64, **kw))
    wrong = {**inputs, "clip_g_pooled": torch.zeros(2, 7)}
    with pytest.raises(ValueError, match="added embeddings"):
        denoise_loop(sdxl.denoiser, DenoiseInputs(wrong, height=64, width=64, **kw))
    with pytest.raises(ValueError, match="no ControlNet"):
        build_reference_pipeline(settings, family="sdxl", controlnet=True)


def test_float16_decodes_in_float32_as_the_pipeline_upcasts(settings: Settings) -> None:
    """SDXL's pipeline decodes a float16 VAE with `force_upcast` in float32 (its float16 weights
    widened); the VAE service loads sdxl-vae so, and the image stays the pipeline's."""
    fp16 = dataclasses.replace(settings, dtype="float16")
    vae = load_vae("sdxl-vae", fp16)
    assert vae.vae.dtype == torch.float32
    assert load_vae("sd15-vae", fp16).vae.dtype == torch.float16  # SD1.5's pipeline does not upcast
    sdxl = Sdxl(
        clip_l=load_text_encoder("clip-l", fp16),
        clip_g=load_text_encoder("clip-g", fp16),
        denoiser=load_denoiser("sdxl-unet", fp16),
        vae=vae,
        pipe=build_reference_pipeline(fp16, family="sdxl"),
    )
    kw = {"height": 64, "width": 64, "num_inference_steps": 2, "guidance_scale": 5.0, "seed": 3}
    pixels = decode(sdxl.vae, mesh_latents(sdxl, "a lighthouse", "", **kw))
    want = reference_images(sdxl.pipe, prompt="a lighthouse", width=64, height=64, steps=2, guidance=5.0, seed=3)
    assert np.array_equal(pixels[0].numpy(), np.asarray(want[0].convert("RGB")))
