"""The oracle for edits, in-process: image-to-image and inpainting for sd3, sd35-large and flux,
with and without LoRAs, against diffusers' own `StableDiffusion3Img2ImgPipeline`,
`StableDiffusion3InpaintPipeline`, `FluxImg2ImgPipeline` and `FluxInpaintPipeline` built from
the very components of the text-to-image oracle (same image, mask, seed and strength).

The services' compute functions are chained as the mesh chains an edit workflow: the VAE's
`prepare_edit` + `encode_edits` (the `image` node), the encoders, the family's edit loop
(`DenoiseInputs.strength`), the VAE's decode. The input image is not of the output size: the
pipelines' resize is part of the contract.

SD3's inpaint pipeline (diffusers 0.42) decodes `latents / scaling_factor` without adding the
VAE's shift factor back, unlike every other SD3 pipeline (and unlike how its own image latents
were made), so the unmasked region would come back shifted; the mesh decodes every family's
latents one way (`services.vae.model.decode`), so there the final latents are compared.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from baseline.pipelines import load_reference_loras
from services.denoiser.denoise import denoise
from services.denoiser.loop import DenoiseInputs
from services.vae.model import decode, encode_edits, prepare_edit
from shared.messages import VaeEncodeParams
from shared.settings import Settings
from shared.zoo import lora_path
from tests.oracle import assert_images_match, image_diff
from tests.unit.test_workflows_match_pipeline import Lab, encoder_outputs

P = "a lighthouse on a cliff, ink drawing"
EDIT_PIPELINES = {
    ("sd3", False): "StableDiffusion3Img2ImgPipeline",
    ("sd3", True): "StableDiffusion3InpaintPipeline",
    ("flux", False): "FluxImg2ImgPipeline",
    ("flux", True): "FluxInpaintPipeline",
}


def edit_image(height: int, width: int) -> torch.Tensor:
    """A picture with structure (gradients, a disc), uint8 (H, W, 3)."""
    y, x = np.mgrid[0:height, 0:width]
    disc = np.hypot(x - width / 3, y - height / 2) < min(width, height) / 4
    rgb = np.stack([x * 255 // width, y * 255 // height, np.where(disc, 230, 40)], axis=-1)
    return torch.from_numpy(rgb.astype(np.uint8))


def edit_mask(height: int, width: int) -> torch.Tensor:
    """diffusers' convention, as the gateway hands it on: 255 (repaint) over the right half."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, width // 2 :] = 255
    return torch.from_numpy(mask)


IMAGE, MASK = edit_image(80, 72), edit_mask(80, 72)


@pytest.fixture(scope="module")
def lab(settings: Settings) -> Lab:
    from shared.zoo import load_text_encoder

    return Lab(settings=settings, encoders={m: load_text_encoder(m, settings) for m in ("clip-l", "clip-g", "t5")})


def mesh_edit(lab: Lab, family: str, *, inpaint: bool, loras=None, output: str = "pixels", **kw) -> np.ndarray:
    """The edit workflow's nodes, chained: image -> (encoders) -> denoise -> decode."""
    fam = lab.family(family)
    params = VaeEncodeParams(family=family, height=kw["height"], width=kw["width"], seed=kw["seed"], purpose="image")
    encoded = encode_edits(fam.vae, [prepare_edit(fam.vae, IMAGE, MASK if inpaint else None, params)])[0]
    tensors = encoder_outputs(lab, family, kw["prompt"], kw.get("negative", "")) | {"image_latents": encoded["latents"]}
    if inpaint:
        tensors["mask"] = encoded["mask"]
    inputs = DenoiseInputs(
        tensors,
        height=kw["height"],
        width=kw["width"],
        num_inference_steps=kw["steps"],
        guidance_scale=kw["guidance"],
        seed=kw["seed"],
        n=kw.get("n", 1),
        strength=kw["strength"],
    )
    with fam.loras.activate(loras or [], lambda name: lora_path(name, lab.settings)):
        latents = denoise(fam.denoiser, inputs)
    if output == "latents":
        return latents.numpy()
    return decode(fam.vae, latents).numpy()


def edit_pipe(lab: Lab, family: str, inpaint: bool):
    """diffusers' edit pipeline over the text-to-image oracle's components (its LoRAs too)."""
    from diffusers import (
        FluxImg2ImgPipeline,
        FluxInpaintPipeline,
        StableDiffusion3Img2ImgPipeline,
        StableDiffusion3InpaintPipeline,
    )

    classes = {c.__name__: c for c in (StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline)}
    classes |= {c.__name__: c for c in (FluxImg2ImgPipeline, FluxInpaintPipeline)}
    base = lab.pipe(family, controlnet=False)
    pipe = classes[EDIT_PIPELINES[("flux" if family == "flux" else "sd3", inpaint)]](**base.components)
    pipe.set_progress_bar_config(disable=True)
    return base, pipe


def pipeline_edit(lab: Lab, family: str, *, inpaint: bool, loras=None, output_type: str = "pil", **kw) -> np.ndarray:
    base, pipe = edit_pipe(lab, family, inpaint)
    load_reference_loras(base, loras or [], lab.settings)  # the components are shared
    args = {
        "prompt": kw["prompt"],
        "image": Image.fromarray(IMAGE.numpy()),
        "strength": kw["strength"],
        "height": kw["height"],
        "width": kw["width"],
        "num_inference_steps": kw["steps"],
        "guidance_scale": kw["guidance"],
        "generator": torch.Generator("cpu").manual_seed(kw["seed"]),
        "num_images_per_prompt": kw.get("n", 1),
        "output_type": output_type,
    }
    if inpaint:
        args["mask_image"] = Image.fromarray(MASK.numpy())
    if family == "flux":
        args["max_sequence_length"] = 512
    else:
        args["negative_prompt"] = kw.get("negative", "")
    with torch.no_grad():
        out = pipe(**args).images
    if output_type == "latent":
        return out.numpy()
    return np.stack([np.asarray(im.convert("RGB")) for im in out])


# (id, family, inpaint?, LoRAs, other parameters)
EDITS = [
    ("sd3-img2img", "sd3", False, None, {"negative": "blurry", "height": 64, "width": 96, "n": 2}),
    ("sd3-inpaint", "sd3", True, None, {"strength": 1.0, "n": 2}),
    ("sd3-inpaint-partial", "sd3", True, None, {"strength": 0.7, "guidance": 1.0}),
    ("sd3-lora-img2img", "sd3", False, [("sd3-lora-a", 0.8)], {"strength": 0.9}),
    ("sd3-lora-inpaint", "sd3", True, [("sd3-lora-b", 1.0)], {"negative": "dark"}),
    ("sd35-large-img2img", "sd35-large", False, None, {"guidance": 4.5}),
    ("sd35-large-lora-inpaint", "sd35-large", True, [("sd35-large-lora-a", 1.0)], {"strength": 0.8}),
    ("flux-img2img", "flux", False, None, {"height": 64, "width": 96, "guidance": 3.5, "n": 2}),
    ("flux-inpaint", "flux", True, None, {"strength": 1.0, "n": 2}),
    ("flux-lora-img2img", "flux", False, [("flux-lora-a", 1.0), ("flux-lora-b", 0.5)], {"strength": 0.5}),
    ("flux-lora-inpaint", "flux", True, [("flux-lora-b", 1.0)], {"strength": 0.7}),
]


@pytest.mark.parametrize(("family", "inpaint", "loras", "params"), [e[1:] for e in EDITS], ids=[e[0] for e in EDITS])
def test_edit_equals_its_pipeline(lab: Lab, family, inpaint, loras, params) -> None:
    kw = {"prompt": P, "height": 64, "width": 64, "steps": 3, "guidance": 4.0, "seed": 21, "strength": 0.6} | params
    if inpaint and family != "flux":  # see the module's docstring: compare the final latents
        got = mesh_edit(lab, family, inpaint=inpaint, loras=loras, output="latents", **kw)
        want = pipeline_edit(lab, family, inpaint=inpaint, loras=loras, output_type="latent", **kw)
        assert got.shape == want.shape == (kw.get("n", 1), 16, kw["height"] // 8, kw["width"] // 8)
        print(f"{family} inpaint loras={loras}: max latent diff {np.abs(got - want).max()}")
        assert np.array_equal(got, want), "not bit-identical to the pipeline's latents"
        return
    got = mesh_edit(lab, family, inpaint=inpaint, loras=loras, **kw)
    want = pipeline_edit(lab, family, inpaint=inpaint, loras=loras, **kw)
    assert got.shape == (kw.get("n", 1), kw["height"], kw["width"], 3) and got.dtype == np.uint8
    worst, identical = image_diff(got, want)
    print(f"{family} inpaint={inpaint} loras={loras}: max diff {worst}, identical {identical:.4%}")
    assert_images_match(got, want)
    assert identical == 1.0, "no longer bit-identical to the pipeline"
    assert got.std() > 5


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_inpainting_keeps_the_unmasked_latents(lab: Lab, family: str) -> None:
    """Outside the mask the final latents are the image's own latents, whatever the prompt;
    inside it they are repainted."""
    kw = {"height": 64, "width": 64, "steps": 2, "guidance": 3.0, "seed": 4, "strength": 1.0}
    a = mesh_edit(lab, family, inpaint=True, output="latents", prompt="a red barn", **kw)
    b = mesh_edit(lab, family, inpaint=True, output="latents", prompt="a blue whale", **kw)
    fam = lab.family(family)
    params = VaeEncodeParams(family=family, height=64, width=64, seed=4, purpose="image")
    image_latents = encode_edits(fam.vae, [prepare_edit(fam.vae, IMAGE, None, params)])[0]["latents"].numpy()
    kept, repainted = slice(0, 3), slice(5, 8)  # latent columns well left / right of the mask's edge at 4
    assert np.array_equal(a[..., kept], image_latents[..., kept])
    assert np.array_equal(b[..., kept], image_latents[..., kept])
    for got in (a, b):
        assert np.abs(got[..., repainted] - image_latents[..., repainted]).mean() > 0.1


def test_edit_refusals(lab: Lab) -> None:
    fam = lab.family("sd3")
    params = VaeEncodeParams(family="sd3", height=64, width=64, seed=0, purpose="image")
    with pytest.raises(ValueError, match="mask"):
        prepare_edit(fam.vae, IMAGE, MASK[:40], params)
    encoded = encode_edits(fam.vae, [prepare_edit(fam.vae, IMAGE, None, params)])[0]
    base = {"height": 64, "width": 64, "num_inference_steps": 2, "guidance_scale": 1.0, "seed": 0}
    tensors = encoder_outputs(lab, "sd3", "a", "") | {"image_latents": encoded["latents"]}
    with pytest.raises(ValueError, match="image_latents"):
        denoise(fam.denoiser, DenoiseInputs(tensors, **(base | {"height": 96}), strength=1.0))


def test_image_encodes_batch_like_alone(lab: Lab) -> None:
    """The VAE service encodes edits' images of one size in one call (as it decodes), each
    sampled with its own seed: each gets (up to the batched call's rounding) its latents alone."""
    from services.vae.runner import VaeRunner

    fam = lab.family("flux")
    items = [
        prepare_edit(fam.vae, image, mask, VaeEncodeParams(family="flux", height=64, width=64, seed=s, purpose="image"))
        for image, mask, s in ((IMAGE, MASK, 1), (edit_image(64, 64), None, 2), (IMAGE, None, 3))
    ]
    runner = VaeRunner(model_id="flux-vae", bundle=fam.vae)
    assert len({runner.batch_key(item) for item in items}) == 1  # one call, masks or not
    assert runner.batch_key(items[0]) != runner.batch_key(torch.zeros(1, 16, 8, 8))  # never with decodes
    together = runner.run_many(items)
    for item, got in zip(items, together, strict=True):
        alone = encode_edits(fam.vae, [item])[0]
        assert set(got) == set(alone) and torch.allclose(got["latents"], alone["latents"], atol=1e-5)
    assert "mask" in together[0] and "mask" not in together[1]
    assert not torch.allclose(together[1]["latents"], together[2]["latents"])  # own image, own seed


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_edits_share_transformer_calls_with_generations(lab: Lab, family: str) -> None:
    """With step-level batching, an img2img, an inpainting and a text-to-image request of one
    size share transformer calls, and each ends as it would alone."""
    from tests.engine import assert_batched_like_alone

    fam = lab.family(family)
    text = encoder_outputs(lab, family, P, "")
    cases = [(text, {"seed": 1})]
    for seed, mask in ((2, None), (3, MASK)):
        params = VaeEncodeParams(family=family, height=64, width=64, seed=seed, purpose="image")
        encoded = encode_edits(fam.vae, [prepare_edit(fam.vae, IMAGE, mask, params)])[0]
        cases.append((text | encoded | {"image_latents": encoded["latents"]}, {"seed": seed, "strength": 1.0}))
    common = {"height": 64, "width": 64, "num_inference_steps": 3, "guidance_scale": 3.0}
    assert_batched_like_alone(fam.denoiser, [(tensors, common | kw) for tensors, kw in cases])
