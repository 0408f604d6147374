"""The whole denoising loop of one request, as diffusers' pipelines run it, per family.

Why a copy of the pipelines' steps rather than a call to a pipeline: the denoiser service
gets the encoders' outputs (and a ControlNet's residuals) from other services and must stop,
report progress and run concurrently; yet its latents must be bit-identical to the
pipeline's. So every step below mirrors the pipeline's prompt layout, latent seeding,
timesteps and loop, using diffusers' own helpers:

* sd3, sd35-large: `StableDiffusion3Pipeline` / `StableDiffusion3ControlNetPipeline`
  (classifier-free guidance over [negative, prompt] rows);
* flux: `FluxPipeline` / `FluxControlNetPipeline` (guidance-distilled: `guidance_scale` goes
  into the transformer as the `guidance` embedding, no second pass; latents packed 2x2);
* sd15: `StableDiffusionPipeline` on a UNet (`sd15.py`; no ControlNet);
* sdxl: `StableDiffusionXLPipeline` on a UNet (`sdxl.py`; no ControlNet). Both UNet families
  share one loop (`unet.py`).

With a `ControlSpec`, the ControlNet runs elsewhere (the adapters service): at each step the
loop hands it the tensors the pipeline's ControlNet call would get and adds the residuals
it returns, exactly where the pipeline would.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_calculate_shift
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    calculate_shift,
    retrieve_timesteps,
)
from diffusers.utils.torch_utils import randn_tensor

from shared.zoo import DenoiserBundle
from shared.zoo.families import FAMILIES

VAE_SCALE_FACTOR = 8
SD3_INPUTS = ("clip_l_embeds", "clip_l_pooled", "clip_g_embeds", "clip_g_pooled", "t5_embeds")
FLUX_INPUTS = ("clip_l_pooler", "t5_embeds")
SD15_INPUTS = ("clip_embeds",)
SDXL_INPUTS = ("clip_l_embeds", "clip_g_embeds", "clip_g_pooled")
INPUTS_OF_FAMILY: dict[str, tuple[str, ...]] = {
    "sd3": SD3_INPUTS,
    "sd35-large": SD3_INPUTS,
    "flux": FLUX_INPUTS,
    "sd15": SD15_INPUTS,
    "sdxl": SDXL_INPUTS,
}

# residuals(constant, varying, params) -> {"block_0": ..., "single_0": ...}; see ControlSpec.
ControlNetFn = Callable[
    [dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float | int]], dict[str, torch.Tensor]
]


class DenoiseCancelled(Exception):
    """Raised when `should_stop()` says the request was cancelled; no latents are returned."""


@dataclass
class ControlSpec:
    """A ControlNet guiding one request.

    `control_latents`: exactly what the VAE's `encode_control_image` returned for this
    request (same family, size, seed, num_images and guidance_scale).
    `residuals(constant, varying, params)` is called once per step (see
    `services.adapters.model.controlnet_residuals` for what it must do):

    * `constant`, the SAME dict object at every step of the request (a remote
      implementation can upload it once): sd3/sd35-large {"prompt_embeds",
      "pooled_projections", "controlnet_cond"}; flux {"prompt_embeds",
      "pooled_projections", "controlnet_cond", "txt_ids", "img_ids", "guidance"}.
    * `varying`: {"hidden_states" (the latent model input), "timestep" (for flux already
      divided by 1000, as the pipeline passes it)}.
    * `params`: {"conditioning_scale" (already times the step's keep factor), "step",
      "num_steps"}.

    It returns {"block_0", ..., "block_{k-1}"} and, for flux, {"single_0", ...}: the
    ControlNet's (scaled) residuals, in order.
    """

    control_latents: torch.Tensor
    conditioning_scale: float
    residuals: ControlNetFn
    control_guidance_start: float = 0.0
    control_guidance_end: float = 1.0

    def scale_at(self, i: int, total: int) -> float:
        """The pipelines' `controlnet_keep[i] * controlnet_conditioning_scale`."""
        keep = 1.0 - float(i / total < self.control_guidance_start or (i + 1) / total > self.control_guidance_end)
        return self.conditioning_scale * keep


def _rows(t: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if t.shape[0] != 2:
        raise ValueError(f"{name} must hold 2 rows [prompt, negative_prompt], got shape {tuple(t.shape)}")
    return t[0:1], t[1:2]


def _repeat(t: torch.Tensor, n: int) -> torch.Tensor:
    """num_images_per_prompt duplication exactly as the pipelines do it (repeat + view)."""
    if t.ndim == 3:
        _, seq_len, _ = t.shape
        return t.repeat(1, n, 1).view(n, seq_len, -1)
    return t.repeat(1, n).view(n, -1)


def _joint(clip_l: torch.Tensor, clip_g: torch.Tensor, t5: torch.Tensor) -> torch.Tensor:
    """SD3's prompt layout: CLIP-L|CLIP-G on channels, zero-padded to T5 width, then T5 tokens after."""
    clip = torch.cat([clip_l, clip_g], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2)


def _residual_list(res: dict[str, torch.Tensor], prefix: str, device: torch.device) -> list[torch.Tensor] | None:
    """{"block_0": a, "block_1": b} -> [a, b]; None when there are none (as the ControlNets return)."""
    out = []
    while f"{prefix}_{len(out)}" in res:
        out.append(res[f"{prefix}_{len(out)}"].to(device))
    return out or None


def warm_up_inputs(bundle: DenoiserBundle) -> dict[str, torch.Tensor]:
    """Zero encoder outputs of the right widths for `bundle`'s family (for a warm-up `denoise`)."""
    cfg = bundle.transformer.config
    if bundle.family == "sd15":
        return {"clip_embeds": torch.zeros(2, 77, cfg.cross_attention_dim)}
    if bundle.family == "sdxl":  # CLIP-L | CLIP-G on channels: any split of the width will do
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        return {
            "clip_l_embeds": torch.zeros(2, 77, 1),
            "clip_g_embeds": torch.zeros(2, 77, cfg.cross_attention_dim - 1),
            "clip_g_pooled": torch.zeros(2, pooled),
        }
    t5 = torch.zeros(2, 8, cfg.joint_attention_dim)
    if bundle.family == "flux":
        return {"clip_l_pooler": torch.zeros(2, cfg.pooled_projection_dim), "t5_embeds": t5}
    half = cfg.pooled_projection_dim // 2
    return {
        "clip_l_embeds": torch.zeros(2, 77, 1),
        "clip_l_pooled": torch.zeros(2, half),
        "clip_g_embeds": torch.zeros(2, 77, 1),
        "clip_g_pooled": torch.zeros(2, cfg.pooled_projection_dim - half),
        "t5_embeds": t5,
    }


@dataclass
class TransformerCall:
    """One call of the base transformer (or UNet) that a request's loop asks for (see `_sd3_loop`).

    `batched`: keyword arguments whose first dimension is the request's batch (tensors, lists
    of tensors such as ControlNet residuals, or None); `shared`: the rest (position ids,
    flags), which must be equal for calls to run together. `cache_context`: the diffusers
    cache context the pipeline wraps this call in (Flux: "cond"). Why: the same loop then
    runs alone (`denoise`) or with other requests in one batched call (`batching.py`).
    The first entry of `batched` is the latent input (`hidden_states`; the UNet's `sample`).
    """

    batched: dict[str, object]
    shared: dict[str, object]
    cache_context: str | None = None

    def rows(self) -> int:
        return int(next(iter(self.batched.values())).shape[0])  # type: ignore[union-attr]


# A request's loop: yields the transformer calls it needs, is sent each call's output (the
# noise prediction), and returns its final latents.
DenoiseLoop = Generator[TransformerCall, torch.Tensor, torch.Tensor]


def call_transformer(transformer: torch.nn.Module, call: TransformerCall) -> torch.Tensor:
    """Run one TransformerCall exactly as the pipeline would (inside inference mode)."""
    if call.cache_context is None:
        return transformer(**call.batched, **call.shared)[0]
    with transformer.cache_context(call.cache_context):
        return transformer(**call.batched, **call.shared)[0]


def run_loop(transformer: torch.nn.Module, loop: DenoiseLoop) -> torch.Tensor:
    """Drive one request's loop alone: every call as the pipeline makes it."""
    with torch.inference_mode():
        try:
            call = next(loop)
            while True:
                call = loop.send(call_transformer(transformer, call))
        except StopIteration as done:
            return done.value


def denoise(
    bundle: DenoiserBundle,
    *,
    inputs: dict[str, torch.Tensor] | None = None,
    height: int,
    width: int,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    num_images: int = 1,
    control: ControlSpec | None = None,
    on_step: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    negative_prompt: str | None = None,
    **named_inputs: torch.Tensor,
) -> torch.Tensor:
    """Run all denoising steps; return the final latents (n, 16, H/8, W/8), before VAE scaling.

    `inputs` (or the same tensors as keyword arguments, the older form) by family:
    sd3/sd35-large: clip_l_embeds, clip_l_pooled, clip_g_embeds, clip_g_pooled, t5_embeds,
    each two rows [prompt, negative_prompt]; the negative row is used only when
    guidance_scale > 1 (classifier-free guidance), as in the pipeline.
    flux: clip_l_pooler (CLIP-L's unprojected pooled output) and t5_embeds (512 tokens, as
    FluxPipeline); row 0 (the prompt) is used, further rows are ignored.
    sd15: clip_embeds (the CLIP text encoder's last hidden state), two rows as for sd3;
    returns (n, 4, H/8, W/8).
    sdxl: clip_l_embeds, clip_g_embeds, clip_g_pooled, two rows as for sd3; returns (n, 4, H/8,
    W/8). `negative_prompt` (the text, read by sdxl only): empty or None means zero negative
    embeddings when the bundle has `force_zeros_for_empty_prompt`, as the pipeline's None.
    Raises DenoiseCancelled if `should_stop()` turns true (checked before every step), and
    ValueError for inputs the model cannot take.
    """
    loop = denoise_loop(
        bundle,
        {**(inputs or {}), **named_inputs},
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        n=num_images,
        control=control,
        on_step=on_step,
        should_stop=should_stop,
        negative_prompt=negative_prompt,
    )
    return run_loop(bundle.transformer, loop)


def denoise_loop(
    bundle: DenoiserBundle,
    tensors: dict[str, torch.Tensor],
    *,
    height: int,
    width: int,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    n: int = 1,
    control: ControlSpec | None = None,
    on_step: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    negative_prompt: str | None = None,
) -> DenoiseLoop:
    """A request's loop, checked but not yet started (arguments as `denoise` takes them): for
    `run_loop`, or for the batching engine to interleave with other requests' loops."""
    family = bundle.family
    if family not in INPUTS_OF_FAMILY:
        raise ValueError(f"unknown family {family!r} for {bundle.model_id}")
    missing = [name for name in INPUTS_OF_FAMILY[family] if name not in tensors]
    if missing:
        raise ValueError(f"{family} denoising needs inputs {list(INPUTS_OF_FAMILY[family])}; missing {missing}")
    # sd3: VAE 8 x patch 2; flux: VAE 8 x 2x2 packing; sd15, sdxl: VAE 8 (the UNet pads odd sizes itself)
    FAMILIES[family].check_size(height, width)
    if n < 1 or num_inference_steps < 1:
        raise ValueError("num_images and num_inference_steps must be >= 1")
    if FAMILIES[family].is_unet:
        if control is not None:
            raise ValueError(f"{bundle.model_id} takes no ControlNet")
        from services.denoiser.sd15 import sd15_loop
        from services.denoiser.sdxl import sdxl_loop

        extra = {"negative_prompt": negative_prompt} if family == "sdxl" else {}
        return (sdxl_loop if family == "sdxl" else sd15_loop)(
            bundle,
            tensors,
            **extra,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            n=n,
            on_step=on_step,
            should_stop=should_stop,
        )
    run = _flux_loop if family == "flux" else _sd3_loop
    return run(
        bundle,
        tensors,
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        n=n,
        control=control,
        on_step=on_step,
        should_stop=should_stop,
    )


def _sd3_loop(
    bundle: DenoiserBundle,
    tensors: dict[str, torch.Tensor],
    *,
    height: int,
    width: int,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    n: int,
    control: ControlSpec | None,
    on_step: Callable[[int, int], None] | None,
    should_stop: Callable[[], bool] | None,
) -> DenoiseLoop:
    """StableDiffusion3Pipeline.__call__ (StableDiffusion3ControlNetPipeline's with `control`).
    Runs under the driver's inference mode (a generator must not enter it: loops interleave)."""
    transformer = bundle.transformer
    device = next(transformer.parameters()).device
    # A fresh scheduler per call: set_timesteps/step keep state that concurrent requests must not share.
    scheduler = type(bundle.scheduler).from_config(bundle.scheduler.config)
    do_cfg = guidance_scale > 1

    pos_l, neg_l = _rows(tensors["clip_l_embeds"], "clip_l_embeds")
    pos_lp, neg_lp = _rows(tensors["clip_l_pooled"], "clip_l_pooled")
    pos_g, neg_g = _rows(tensors["clip_g_embeds"], "clip_g_embeds")
    pos_gp, neg_gp = _rows(tensors["clip_g_pooled"], "clip_g_pooled")
    pos_t5, neg_t5 = _rows(tensors["t5_embeds"], "t5_embeds")
    # In the transformer's dtype: the encoders may run in another (e.g. float32 on a CPU host).
    here = {"device": device, "dtype": transformer.dtype}
    prompt_embeds = _joint(_repeat(pos_l, n), _repeat(pos_g, n), _repeat(pos_t5, n)).to(**here)
    pooled = torch.cat([_repeat(pos_lp, n), _repeat(pos_gp, n)], dim=-1).to(**here)
    if do_cfg:
        neg_embeds = _joint(_repeat(neg_l, n), _repeat(neg_g, n), _repeat(neg_t5, n)).to(**here)
        neg_pooled = torch.cat([_repeat(neg_lp, n), _repeat(neg_gp, n)], dim=-1).to(**here)
        prompt_embeds = torch.cat([neg_embeds, prompt_embeds], dim=0)
        pooled = torch.cat([neg_pooled, pooled], dim=0)

    constant: dict[str, torch.Tensor] = {}
    if control is not None:
        want = (prompt_embeds.shape[0], transformer.config.in_channels, height // 8, width // 8)
        if tuple(control.control_latents.shape) != want:
            raise ValueError(
                f"control_latents of shape {tuple(control.control_latents.shape)} do not fit this request "
                f"(want {want}: encode the control image with the same size, num_images and guidance_scale)"
            )
        constant = {
            "prompt_embeds": prompt_embeds,
            "pooled_projections": pooled,
            "controlnet_cond": control.control_latents.to(**here),
        }

    shape = (n, transformer.config.in_channels, height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR)
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)

    scheduler_kwargs = {}
    # The ControlNet pipeline never passes `mu`; the plain one does when the scheduler shifts by size.
    if control is None and scheduler.config.get("use_dynamic_shifting", None):
        patch = transformer.config.patch_size
        image_seq_len = (shape[2] // patch) * (shape[3] // patch)
        scheduler_kwargs["mu"] = calculate_shift(
            image_seq_len,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.16),
        )
    timesteps, num_inference_steps = retrieve_timesteps(
        scheduler, num_inference_steps, device, sigmas=None, **scheduler_kwargs
    )
    total = len(timesteps)

    for i, t in enumerate(timesteps):
        if should_stop is not None and should_stop():
            raise DenoiseCancelled(f"stopped before step {i + 1}/{total}")
        latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
        timestep = t.expand(latent_model_input.shape[0])
        block_residuals = None
        if control is not None:
            varying = {"hidden_states": latent_model_input, "timestep": timestep}
            params = {"conditioning_scale": control.scale_at(i, total), "step": i, "num_steps": total}
            block_residuals = _residual_list(control.residuals(constant, varying, params), "block", device)
        noise_pred = yield TransformerCall(
            batched={
                "hidden_states": latent_model_input,
                "timestep": timestep,
                "encoder_hidden_states": prompt_embeds,
                "pooled_projections": pooled,
                "block_controlnet_hidden_states": block_residuals,
            },
            shared={"joint_attention_kwargs": None, "return_dict": False},
        )
        if do_cfg:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i + 1, total)
    return latents


def _flux_loop(
    bundle: DenoiserBundle,
    tensors: dict[str, torch.Tensor],
    *,
    height: int,
    width: int,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    n: int,
    control: ControlSpec | None,
    on_step: Callable[[int, int], None] | None,
    should_stop: Callable[[], bool] | None,
) -> DenoiseLoop:
    """FluxPipeline.__call__ (FluxControlNetPipeline's with `control`), without true CFG."""
    transformer = bundle.transformer
    device = next(transformer.parameters()).device
    scheduler = type(bundle.scheduler).from_config(bundle.scheduler.config)

    here = {"device": device, "dtype": transformer.dtype}  # as in the SD3 loop
    pooled = _repeat(tensors["clip_l_pooler"][0:1], n).to(**here)
    prompt_embeds = _repeat(tensors["t5_embeds"][0:1], n).to(**here)
    text_ids = torch.zeros(prompt_embeds.shape[1], 3).to(device=device, dtype=pooled.dtype)

    channels = transformer.config.in_channels // 4
    lat_h, lat_w = 2 * (height // (VAE_SCALE_FACTOR * 2)), 2 * (width // (VAE_SCALE_FACTOR * 2))
    shape = (n, channels, lat_h, lat_w)
    generator = torch.Generator("cpu").manual_seed(seed)
    if control is not None:
        want = (n, (lat_h // 2) * (lat_w // 2), channels * 4)
        if tuple(control.control_latents.shape) != want:
            raise ValueError(
                f"control_latents of shape {tuple(control.control_latents.shape)} do not fit this request "
                f"(want {want}: encode the control image with the same size and num_images)"
            )
        # FluxControlNetPipeline samples the control image's latents with the request's generator
        # first, then the initial noise: the VAE service drew the former from the same seed, so
        # advance our generator by the same draw.
        randn_tensor(shape, generator=generator, device=device, dtype=control.control_latents.dtype)
    latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
    latents = FluxPipeline._pack_latents(latents, n, channels, lat_h, lat_w)
    img_ids = FluxPipeline._prepare_latent_image_ids(n, lat_h // 2, lat_w // 2, device, prompt_embeds.dtype)

    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    if control is None and getattr(scheduler.config, "use_flow_sigmas", False):
        sigmas = None  # FluxPipeline only; the ControlNet pipeline does not look
    mu = flux_calculate_shift(
        latents.shape[1],
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    timesteps, num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
    total = len(timesteps)

    constant: dict[str, torch.Tensor] = {}
    if control is None:
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(n)
        scheduler.set_begin_index(0)
    else:
        # FluxControlNetPipeline builds the same values as torch.tensor([guidance_scale]).
        guidance_all = torch.tensor([guidance_scale], device=device).expand(n)
        guidance = guidance_all if transformer.config.guidance_embeds else None
        constant = {
            "prompt_embeds": prompt_embeds,
            "pooled_projections": pooled,
            "controlnet_cond": control.control_latents.to(**here),
            "txt_ids": text_ids,
            "img_ids": img_ids,
            "guidance": guidance_all,  # the adapter drops it for a ControlNet without guidance_embeds
        }

    for i, t in enumerate(timesteps):
        if should_stop is not None and should_stop():
            raise DenoiseCancelled(f"stopped before step {i + 1}/{total}")
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        kwargs = {}
        if control is not None:
            varying = {"hidden_states": latents, "timestep": timestep / 1000}
            params = {"conditioning_scale": control.scale_at(i, total), "step": i, "num_steps": total}
            res = control.residuals(constant, varying, params)
            kwargs = {
                "controlnet_block_samples": _residual_list(res, "block", device),
                "controlnet_single_block_samples": _residual_list(res, "single", device),
            }  # and controlnet_blocks_repeat=False: hint-block (XLabs) ControlNets are refused at load
        noise_pred = yield TransformerCall(
            batched={
                "hidden_states": latents,
                "timestep": timestep / 1000,
                "guidance": guidance,
                "pooled_projections": pooled,
                "encoder_hidden_states": prompt_embeds,
                "controlnet_block_samples": kwargs.get("controlnet_block_samples"),
                "controlnet_single_block_samples": kwargs.get("controlnet_single_block_samples"),
            },
            shared={
                "txt_ids": text_ids,
                "img_ids": img_ids,
                "joint_attention_kwargs": {},
                "return_dict": False,
                **({"controlnet_blocks_repeat": False} if kwargs else {}),
            },
            cache_context="cond",
        )
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i + 1, total)
    latents = FluxPipeline._unpack_latents(latents, height, width, VAE_SCALE_FACTOR)
    return latents
