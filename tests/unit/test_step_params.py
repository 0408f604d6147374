"""Step parameters are built once from the family descriptor: what each node gets, and what is refused."""

from __future__ import annotations

import pytest

from shared.messages import ControlNetChoice, DenoiseParams, EncodeParams, LoraChoice, VaeEncodeParams
from shared.workflows.catalogue import catalogue
from shared.workflows.step_params import RequestParams, step_params


def _req(**kw) -> RequestParams:
    base = {"prompt": "a cat", "height": 64, "width": 64, "num_inference_steps": 3, "guidance_scale": 5.0, "seed": 7}
    return RequestParams(**{**base, **kw})


def test_unet_families_take_multiples_of_8_and_the_mmdits_of_16() -> None:
    for name in ("sd15", "sdxl"):
        params = step_params(catalogue()[name], _req(height=72, width=88))
        assert params["denoise"].height == 72 and params["denoise"].width == 88
    for name in ("sd3", "sd35-large", "flux"):
        with pytest.raises(ValueError, match="multiples of 16"):
            step_params(catalogue()[name], _req(height=72))


def test_flux_encodes_the_prompt_only_with_its_own_outputs_and_t5_length() -> None:
    params = step_params(catalogue()["flux"], _req())
    assert params["clip_l"] == EncodeParams(prompt="a cat", negative=False, outputs=["pooler"])
    assert params["t5"] == EncodeParams(prompt="a cat", negative=False, max_sequence_length=512)
    with pytest.raises(ValueError, match="guidance-distilled"):
        step_params(catalogue()["flux"], _req(negative_prompt="blurry"))


def test_the_negative_text_reaches_the_loop_only_where_it_reads_it() -> None:
    sdxl = step_params(catalogue()["sdxl"], _req(negative_prompt="blurry"))
    sd3 = step_params(catalogue()["sd3"], _req(negative_prompt="blurry"))
    assert sdxl["denoise"].negative_prompt == "blurry"
    assert sd3["denoise"].negative_prompt is None
    assert sd3["t5"].negative_prompt == "blurry" and sd3["t5"].max_sequence_length == 256


def test_controlnet_and_lora_variants_carry_their_choices() -> None:
    cn = ControlNetChoice(model="sd3-controlnet", conditioning_scale=0.5)
    lora = LoraChoice(name="sd3-lora-a", scale=0.8)
    params = step_params(catalogue()["sd3-controlnet-lora"], _req(n=2, controlnet=cn, loras=[lora]))
    assert isinstance(params["denoise"], DenoiseParams)
    assert params["denoise"].controlnet == cn and params["denoise"].loras == [lora]
    assert params["control"] == VaeEncodeParams(family="sd3", height=64, width=64, seed=7, n=2, guidance_scale=5.0)
    plain = step_params(catalogue()["sd3"], _req(controlnet=cn, loras=[lora]))
    assert plain["denoise"].controlnet is None and plain["denoise"].loras == []
    with pytest.raises(ValueError, match="needs a controlnet"):
        step_params(catalogue()["sd3-controlnet"], _req())
