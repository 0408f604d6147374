"""The step-loop machinery every family's denoising loop shares.

Why a copy of the pipelines' steps rather than a call to a pipeline: the denoiser service
gets the encoders' outputs (and a ControlNet's residuals) from other services and must stop,
report progress and run concurrently; yet its latents must be bit-identical to the
pipeline's. So each family's loop (one module per family under `services/denoiser/families/`)
mirrors its pipeline's prompt layout, latent seeding, timesteps and loop, using diffusers' own
helpers:

* sd3, sd35-large (`families/sd3.py`): `StableDiffusion3Pipeline` /
  `StableDiffusion3ControlNetPipeline` (classifier-free guidance over [negative, prompt] rows);
* flux (`families/flux.py`): `FluxPipeline` / `FluxControlNetPipeline` (guidance-distilled:
  `guidance_scale` goes into the transformer as the `guidance` embedding, no second pass;
  latents packed 2x2);
* sd15, sdxl (`families/sd15.py`, `families/sdxl.py`): `StableDiffusionPipeline` /
  `StableDiffusionXLPipeline` on a UNet, one shared loop (`families/unet.py`); no ControlNet.

A family's loop is a plain function of (model bundle, scheduler, `DenoiseInputs`) that
yields the `TransformerCall`s it needs (so the same loop runs alone, `run_loop`, or batched
with other requests', `batching.py`) and returns the final latents. Each family module
offers its loop as a `FamilyLoop`; `services/denoiser/families/__init__.py` gathers them
and `services/denoiser/denoise.py` dispatches to them, checking once, from the family
descriptor (`shared.zoo.families`), what is checked the same way for every family (required
inputs, size multiple, ControlNet or not).

With a `ControlSpec`, the ControlNet runs elsewhere (the adapters service): at each step the
loop hands it the tensors the pipeline's ControlNet call would get and adds the residuals
it returns, exactly where the pipeline would.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from shared.messages import DenoiseParams
from shared.zoo import DenoiserBundle

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

    def residuals_at(
        self, constant: dict[str, torch.Tensor], varying: dict[str, torch.Tensor], i: int, total: int
    ) -> dict[str, torch.Tensor]:
        """The ControlNet's residuals for step `i` of `total`."""
        params = {"conditioning_scale": self.scale_at(i, total), "step": i, "num_steps": total}
        return self.residuals(constant, varying, params)

    def check_shape(self, want: tuple[int, ...], alike: str) -> None:
        """Refuse control latents encoded for another request (`alike`: what must match)."""
        if tuple(self.control_latents.shape) != want:
            raise ValueError(
                f"control_latents of shape {tuple(self.control_latents.shape)} do not fit this request "
                f"(want {want}: encode the control image with the same {alike})"
            )


def residual_list(res: dict[str, torch.Tensor], prefix: str, device: torch.device) -> list[torch.Tensor] | None:
    """{"block_0": a, "block_1": b} -> [a, b]; None when there are none (as the ControlNets return)."""
    out: list[torch.Tensor] = []
    while f"{prefix}_{len(out)}" in res:
        out.append(res[f"{prefix}_{len(out)}"].to(device))
    return out or None


@dataclass(frozen=True)
class DenoiseInputs:
    """One request's denoising, as every family's loop takes it.

    `tensors`: the encoders' outputs the family needs (`FamilyDescriptor.denoiser_inputs`),
    each two rows [prompt, negative_prompt]; the negative row is read only with
    classifier-free guidance (guidance_scale > 1), and not at all by guidance-distilled
    families (flux). Other entries are ignored, but for an edit (`strength` set): its
    "image_latents" (1, C, h, w), as the VAE's `encode_edits` made them, and, inpainting, its
    "mask" (1, 1, h, w). `n`: images per prompt.
    `negative_prompt`: the text, read by families whose loop needs it (SDXL: empty or None
    means zero negative embeddings when the bundle has `force_zeros_for_empty_prompt`, as the
    pipeline's None). `on_step(done, total)` follows the pipeline's progress bar;
    `should_stop()` is asked before every step (True: `DenoiseCancelled`).
    """

    tensors: Mapping[str, torch.Tensor]
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    n: int = 1
    negative_prompt: str | None = None
    control: ControlSpec | None = None
    strength: float | None = None  # an edit: the family's edit loop, from tensors["image_latents"]
    on_step: Callable[[int, int], None] | None = None
    should_stop: Callable[[], bool] | None = None

    @classmethod
    def from_params(
        cls,
        tensors: Mapping[str, torch.Tensor],
        params: DenoiseParams,
        *,
        control: ControlSpec | None = None,
        on_step: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> DenoiseInputs:
        """A denoise step's inputs: the tensors it received, its typed parameters by name (the
        ControlNet and LoRA choices are the runner's to resolve: `control` is the resolved one)."""
        by_name = {f.name for f in fields(cls)} & set(type(params).model_fields)
        return cls(
            tensors=tensors,
            control=control,
            on_step=on_step,
            should_stop=should_stop,
            **{name: getattr(params, name) for name in by_name},
        )

    def generator(self) -> torch.Generator:
        """The request's generator, on the CPU as the pipelines' callers pass it: the same noise on any device."""
        return torch.Generator("cpu").manual_seed(self.seed)

    def steps(
        self, timesteps: torch.Tensor, num_inference_steps: int, order: int
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """The pipelines' `for i, t in enumerate(timesteps)`, with what every loop does between steps:
        `should_stop()` before each (DenoiseCancelled), and `on_step(done, num_inference_steps)`
        when the pipeline's progress bar advances (a multistep scheduler's extra calls, such as
        PNDM's first timestep run twice, count as warm-up)."""
        num_warmup_steps = max(len(timesteps) - num_inference_steps * order, 0)
        done = 0
        for i, t in enumerate(timesteps):
            if self.should_stop is not None and self.should_stop():
                raise DenoiseCancelled(f"stopped before step {i + 1}/{len(timesteps)}")
            yield i, t
            if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % order == 0):
                done += 1
                if self.on_step is not None:
                    self.on_step(done, num_inference_steps)


# -- batching rows and prompt layout, as the pipelines' encode_prompt ----------------------------


def rows(t: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The [prompt, negative_prompt] rows of an encoder output, each kept 2-D or 3-D."""
    if t.shape[0] != 2:
        raise ValueError(f"{name} must hold 2 rows [prompt, negative_prompt], got shape {tuple(t.shape)}")
    return t[0:1], t[1:2]


def repeat(t: torch.Tensor, n: int) -> torch.Tensor:
    """num_images_per_prompt duplication exactly as the pipelines do it (repeat + view)."""
    if t.ndim == 3:
        _, seq_len, _ = t.shape
        return t.repeat(1, n, 1).view(n, seq_len, -1)
    return t.repeat(1, n).view(n, -1)


def guided_batch(prompt: torch.Tensor, negative: torch.Tensor | None, n: int, here: dict[str, Any]) -> torch.Tensor:
    """`n` copies of the prompt row, after `n` of the negative row when guided (`negative` not
    None): the pipelines' `torch.cat([negative_prompt_embeds, prompt_embeds])`, moved `here`."""
    batch = repeat(prompt, n).to(**here)
    if negative is None:
        return batch
    return torch.cat([repeat(negative, n).to(**here), batch])


_PLACEMENTS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[torch.Tensor, dict[str, Any], torch.dtype]] = (
    weakref.WeakKeyDictionary()
)


def placement(network: torch.nn.Module) -> dict[str, Any]:
    """Where a loop's tensors go: the network's device and dtype (the encoders may run in
    another dtype, e.g. float32 on a CPU host). Remembered per network while its first
    parameter stays where it is: diffusers' `network.dtype` walks every module (0.7 ms of a
    tiny model's 8 ms step, paid at every request's start)."""
    first = next(network.parameters())
    known = _PLACEMENTS.get(network)
    if known is not None and known[0] is first and known[1]["device"] == first.device and known[2] == first.dtype:
        return dict(known[1])
    here = {"device": first.device, "dtype": network.dtype}
    _PLACEMENTS[network] = (first, here, first.dtype)
    return dict(here)


# -- classifier-free guidance ----------------------------------------------------------------------


def guided_input(latents: torch.Tensor, do_cfg: bool) -> torch.Tensor:
    """The latent model input: the latents twice ([uncond, cond]) with classifier-free guidance."""
    return torch.cat([latents] * 2) if do_cfg else latents


def guide(noise_pred: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance over a [uncond, cond] noise prediction, as the pipelines compute it."""
    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
    return noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)


# -- the calls a loop asks for, and running a loop alone --------------------------------------------


@dataclass
class TransformerCall:
    """One call of the base transformer (or UNet) that a request's loop asks for.

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
        return int(next(iter(self.batched.values())).shape[0])  # type: ignore[attr-defined]


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


# -- the family loops, registered by their modules ---------------------------------------------------

# A diffusers scheduler (a SchedulerMixin and ConfigMixin, typed loosely as the pipelines hold it).
Scheduler = Any
# loop(bundle, scheduler, inputs): a fresh scheduler per request (set_timesteps and step keep
# state that concurrent requests must not share); the family's checks in `denoise_loop` done.
LoopFn = Callable[[DenoiserBundle, Scheduler, DenoiseInputs], DenoiseLoop]
# warm_up(bundle): zero encoder outputs of the widths `bundle`'s network takes.
WarmUpFn = Callable[[DenoiserBundle], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class FamilyLoop:
    """What a family module offers: the families it serves (names of
    `shared.zoo.families.FAMILIES`), its loop, and zero inputs for a warm-up run."""

    families: tuple[str, ...]
    loop: LoopFn
    warm_up_inputs: WarmUpFn
