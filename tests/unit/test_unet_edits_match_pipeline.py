"""The oracle for the UNet families' edits, in-process: sd15 and sdxl image-to-image and
inpainting, chained as the mesh chains an edit workflow (the VAE's `prepare_edit` +
`encode_edits`, the encoders, the UNet loop with `DenoiseInputs.strength`, the VAE's decode),
against diffusers' `StableDiffusionImg2ImgPipeline`, `StableDiffusionInpaintPipeline`,
`StableDiffusionXLImg2ImgPipeline` and `StableDiffusionXLInpaintPipeline` made `from_pipe` of
the text-to-image oracle (same image, mask, seed and strength), bit for bit.

The img2img pipelines of these families take no size (the image's own, rounded to 8), so the
image here is of the output size: the mesh's resize to `size` is then the identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from PIL import Image

from baseline.pipelines import build_reference_pipeline
from services.denoiser.denoise import denoise
from services.denoiser.loop import DenoiseInputs
from services.encoder.model import encode
from services.vae.model import decode, encode_edits, prepare_edit
from shared.messages import VaeEncodeParams
from shared.settings import Settings
from shared.zoo import load_denoiser, load_text_encoder, load_vae
from shared.zoo.families import FAMILIES
from tests.oracle import pipeline_negative_prompt
from tests.unit.test_edits_match_pipeline import edit_image, edit_mask

P = "a lighthouse on a cliff, ink drawing"


@dataclass
class Unets:
    settings: Settings
    models: dict = field(default_factory=dict)

    def get(self, family: str) -> dict:
        if family not in self.models:
            desc = FAMILIES[family]  # type: ignore[index]
            encoders = [u.model_id for u in desc.encoders]
            self.models[family] = {
                "encoders": {m: load_text_encoder(m, self.settings) for m in encoders},
                "denoiser": load_denoiser(desc.denoiser, self.settings),
                "vae": load_vae(desc.vae, self.settings),
                "pipe": build_reference_pipeline(self.settings, family=family),
            }
        return self.models[family]


@pytest.fixture(scope="module")
def unets(settings: Settings) -> Unets:
    return Unets(settings)


def encoder_outputs(models: dict, family: str, prompt: str, negative: str) -> dict[str, torch.Tensor]:
    texts = [prompt, negative]
    enc = models["encoders"]
    if family == "sd15":
        return {"clip_embeds": encode(enc["sd15-clip"], texts, outputs=("last",))["last"]}
    g = encode(enc["clip-g"], texts, outputs=("embeds", "pooled"))
    return {
        "clip_l_embeds": encode(enc["clip-l"], texts, outputs=("embeds",))["embeds"],
        "clip_g_embeds": g["embeds"],
        "clip_g_pooled": g["pooled"],
    }


def mesh_edit(unets: Unets, family: str, inpaint: bool, **kw) -> np.ndarray:
    models = unets.get(family)
    image, mask = edit_image(kw["height"], kw["width"]), edit_mask(kw["height"], kw["width"])
    params = VaeEncodeParams(family=family, height=kw["height"], width=kw["width"], seed=kw["seed"], purpose="image")
    encoded = encode_edits(models["vae"], [prepare_edit(models["vae"], image, mask if inpaint else None, params)])[0]
    tensors = encoder_outputs(models, family, P, kw["negative"]) | {"image_latents": encoded["latents"]}
    if inpaint:
        tensors["mask"] = encoded["mask"]
    progress: list[tuple[int, int]] = []
    inputs = DenoiseInputs(
        tensors,
        height=kw["height"],
        width=kw["width"],
        num_inference_steps=kw["steps"],
        guidance_scale=kw["guidance"],
        seed=kw["seed"],
        n=kw["n"],
        negative_prompt=kw["negative"],
        strength=kw["strength"],
        on_step=lambda done, total: progress.append((done, total)),
    )
    latents = denoise(models["denoiser"], inputs)
    assert progress and progress[-1][0] == progress[-1][1]  # the progress bar's total: the steps run
    return decode(models["vae"], latents).numpy()


def pipeline_edit(unets: Unets, family: str, inpaint: bool, **kw) -> np.ndarray:
    from diffusers import (
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
    )

    classes = {
        ("sd15", False): StableDiffusionImg2ImgPipeline,
        ("sd15", True): StableDiffusionInpaintPipeline,
        ("sdxl", False): StableDiffusionXLImg2ImgPipeline,
        ("sdxl", True): StableDiffusionXLInpaintPipeline,
    }
    base = unets.get(family)["pipe"]
    pipe = classes[(family, inpaint)].from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    args = {
        "prompt": P,
        "negative_prompt": pipeline_negative_prompt(pipe, kw["negative"]),
        "image": Image.fromarray(edit_image(kw["height"], kw["width"]).numpy()),
        "strength": kw["strength"],
        "num_inference_steps": kw["steps"],
        "guidance_scale": kw["guidance"],
        "generator": torch.Generator("cpu").manual_seed(kw["seed"]),
        "num_images_per_prompt": kw["n"],
    }
    if inpaint:
        args |= {"mask_image": Image.fromarray(edit_mask(kw["height"], kw["width"]).numpy())}
        args |= {"height": kw["height"], "width": kw["width"]}
    with torch.no_grad():
        images = pipe(**args).images
    return np.stack([np.asarray(im.convert("RGB")) for im in images])


EDITS = [
    ("sd15-img2img", "sd15", False, {"negative": "blurry", "n": 2}),
    ("sd15-inpaint", "sd15", True, {"strength": 1.0}),
    ("sd15-inpaint-partial", "sd15", True, {"strength": 0.75, "guidance": 1.0, "height": 96}),
    ("sdxl-img2img", "sdxl", False, {"height": 96}),
    ("sdxl-inpaint", "sdxl", True, {"strength": 1.0, "negative": "dark", "n": 2}),
    ("sdxl-inpaint-partial", "sdxl", True, {"strength": 0.7}),
]


@pytest.mark.parametrize(("family", "inpaint", "params"), [e[1:] for e in EDITS], ids=[e[0] for e in EDITS])
def test_unet_edit_equals_its_pipeline(unets: Unets, family: str, inpaint: bool, params: dict) -> None:
    kw = {"height": 64, "width": 64, "steps": 4, "guidance": 5.0, "seed": 9, "strength": 0.6, "n": 1, "negative": ""}
    kw |= params
    got = mesh_edit(unets, family, inpaint, **kw)
    want = pipeline_edit(unets, family, inpaint, **kw)
    assert got.shape == (kw["n"], kw["height"], kw["width"], 3)
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    print(f"{family} inpaint={inpaint}: max diff {diff.max()}, identical {(diff == 0).mean():.4%}")
    assert np.array_equal(got, want), f"max diff {diff.max()}"
    assert got.std() > 5
