"""Run a request's denoising loop: the one entry point, for whichever family the bundle is.

Why apart from `loop.py`: the family modules build on `loop.py`, and this dispatcher needs
them all (`services.denoiser.families.FAMILY_LOOPS`); with both in one module the imports
would go round in a circle.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch

from services.denoiser.families import EDIT_LOOPS, FAMILY_LOOPS
from services.denoiser.loop import DenoiseInputs, DenoiseLoop, FamilyLoop, LoopFn, run_loop
from shared.zoo import DenoiserBundle
from shared.zoo.families import family


def _loop_of(name: str) -> FamilyLoop:
    try:
        return FAMILY_LOOPS[name]
    except KeyError:
        raise ValueError(f"no denoising loop for family {name!r} (have: {sorted(FAMILY_LOOPS)})") from None


def _edit_loop_of(name: str, inputs: DenoiseInputs) -> LoopFn:
    """The family's edit loop (img2img, inpainting); ValueError for a family without one, or
    an edit with a ControlNet (no edit pipeline takes one)."""
    if inputs.control is not None:
        raise ValueError("an edit (strength set) takes no ControlNet")
    if not 0 < (inputs.strength or 0) <= 1:
        raise ValueError(f"strength must be in (0, 1], got {inputs.strength}")
    try:
        return EDIT_LOOPS[name]
    except KeyError:
        raise ValueError(f"no edit loop for family {name!r} (have: {sorted(EDIT_LOOPS)})") from None


def warm_up_inputs(bundle: DenoiserBundle) -> dict[str, torch.Tensor]:
    """Zero encoder outputs of the right widths for `bundle`'s family (for a warm-up `denoise`)."""
    return _loop_of(bundle.family).warm_up_inputs(bundle)


def denoise_loop(bundle: DenoiserBundle, inputs: DenoiseInputs) -> DenoiseLoop:
    """A request's loop, checked but not yet started: for `run_loop`, or for the batching
    engine to interleave with other requests' loops. Raises ValueError for inputs the model
    cannot take (some only once the loop starts, as the pipeline finds them)."""
    descriptor = family(bundle.family)
    missing = [name for name in descriptor.denoiser_inputs if name not in inputs.tensors]
    if missing:
        raise ValueError(
            f"{descriptor.name} denoising needs inputs {list(descriptor.denoiser_inputs)}; missing {missing}"
        )
    descriptor.check_size(inputs.height, inputs.width)
    if inputs.n < 1 or inputs.num_inference_steps < 1:
        raise ValueError("num_images and num_inference_steps must be >= 1")
    if inputs.control is not None and descriptor.controlnet is None:
        raise ValueError(f"{bundle.model_id} takes no ControlNet")
    if inputs.strength is not None:
        return _edit_loop_of(descriptor.name, inputs)(bundle, fresh_scheduler(bundle.scheduler), inputs)
    return _loop_of(descriptor.name).loop(bundle, fresh_scheduler(bundle.scheduler), inputs)


_FRESH: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def fresh_scheduler(scheduler: Any) -> Any:
    """A new scheduler of `scheduler`'s class and config, as the pipelines' callers build one per
    request: a copy of one built that way and never stepped. `from_config` inspects the class's
    signature each time (0.4-1.2 ms, every request, where a tiny model's step is 8 ms); the
    copy of a fresh one is the same state for a quarter of that."""
    template = _FRESH.get(scheduler)
    if template is None:
        template = _FRESH[scheduler] = type(scheduler).from_config(scheduler.config)
    return copy.deepcopy(template)


def denoise(bundle: DenoiserBundle, inputs: DenoiseInputs) -> torch.Tensor:
    """Run all denoising steps alone; return the final latents (n, C, H/8, W/8), before VAE
    scaling (C: the family's latent channels). Raises DenoiseCancelled if `should_stop()`
    turns true, and ValueError for inputs the model cannot take."""
    return run_loop(bundle.transformer, denoise_loop(bundle, inputs))
