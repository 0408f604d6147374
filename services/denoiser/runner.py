"""Denoiser service: a base model (an MMDiT, or a UNet) and its scheduler run a request's
whole denoising loop.

One loaded base serves every workflow of its family: the request's LoRAs are switched on for
its loop and off after (adapters loaded once, kept in a bounded LRU cache), and ControlNet
workflows get their residuals from the adapters service at every step. With a max batch > 1
(`LEGO_DENOISE_MAX_BATCH`; 2 by default on a GPU) up to that many requests are in hand at
once and share transformer calls step by step (`batching.py`); requests with different LoRA
sets or sizes take turns, step by step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from shared.messages import DenoiseParams, LoraChoice, StepKind, StepRequest
from shared.service import ServiceSpec, StepContext, param_bytes
from shared.settings import Settings
from shared.worker import BadStepInput, StepCancelled

log = logging.getLogger("lego.denoiser")


@dataclass
class DenoiserRunner:
    model_id: str
    bundle: Any
    settings: Settings
    kinds: tuple[StepKind, ...] = (StepKind.DENOISE,)
    loras: Any = field(default=None)  # LoraCache (adapters in the network), built at load
    host: Any = field(default=None)  # HostLoraCache (LoRA files read into memory), built at load
    _paths: dict[str, Any] = field(default_factory=dict)  # adapter key -> its file
    _forgotten: set[str] = field(default_factory=set)  # deleted LoRAs the network may still hold
    engine: Any = field(default=None)  # BatchEngine when batching (max batch > 1), else loops run alone
    concurrency: int = 1  # steps in hand at once: the engine's max batch

    def run(self, step: StepRequest, inputs: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        p = step.params
        if not isinstance(p, DenoiseParams):
            raise BadStepInput(f"a denoise step needs DenoiseParams, got {type(p).__name__}")
        loras = self._lora_set(p.loras)
        keys = [key for key, _ in loras]
        with self.host.holding(keys):  # held until the loop ends: not evicted, even if deleted meanwhile
            for key in keys:  # never denoise without them: wait for each read (prefetched: done already)
                try:
                    self.host.get(key, self._paths[key])
                except (OSError, ValueError) as exc:
                    raise BadStepInput(f"LoRA {key!r} cannot be read: {exc}") from exc
            return self._denoise(step, inputs, ctx, loras)

    def _denoise(
        self, step: StepRequest, inputs: dict[str, Any], ctx: StepContext, loras: list[tuple[str, float]]
    ) -> dict[str, Any]:
        from services.denoiser.denoise import denoise_loop
        from services.denoiser.group.engine import RequestFacts
        from services.denoiser.loop import DenoiseCancelled, DenoiseInputs, run_loop

        p = step.params
        assert isinstance(p, DenoiseParams)  # checked by run
        control, remote_cn = self._control(step, inputs, ctx)
        try:
            loop_inputs = DenoiseInputs.from_params(
                inputs, p, control=control, on_step=ctx.progress, should_stop=ctx.should_stop
            )
            loop = denoise_loop(self.bundle, loop_inputs)  # checks the inputs against the family's descriptor
            if self.engine is not None:  # joins the running batch at its next step (on a group: at its degree)
                facts = RequestFacts(
                    label=step.request_id, steps=self._steps_run(p), deadline=step.deadline, inputs=loop_inputs
                )
                latents = self.engine.submit(loop, loras, facts).result()
            else:
                self._drop_forgotten(loras)
                with self.loras.activate(loras, self._lora_source):
                    latents = run_loop(self.bundle.transformer, loop)
        except DenoiseCancelled as exc:
            raise StepCancelled(str(exc)) from exc
        except ValueError as exc:  # inputs, shapes or sizes the model cannot take: no replica could
            raise BadStepInput(str(exc)) from exc
        finally:
            if remote_cn is not None:
                remote_cn.close()
        return {"latents": latents}

    def _steps_run(self, params: DenoiseParams) -> int:
        """The denoising steps the request runs: an edit runs the last `strength` of its schedule."""
        if params.strength is None:
            return params.num_inference_steps
        from shared.workflows.edits import edit_steps
        from shared.zoo.families import family

        unet = family(self.bundle.family).is_unet
        return edit_steps(params.num_inference_steps, params.strength, unet)[1]

    def _control(self, step: StepRequest, inputs: dict[str, Any], ctx: StepContext) -> tuple[Any, Any]:
        """The ControlSpec of a ControlNet workflow (None otherwise), calling the adapters service."""
        spec = step.params.controlnet  # type: ignore[union-attr]
        if spec is None:
            return None, None
        from services.denoiser.loop import ControlSpec
        from services.denoiser.remote_controlnet import RemoteControlNet

        if "control_latents" not in inputs:
            raise BadStepInput("a controlnet step needs the 'control_latents' input")
        remote_cn = RemoteControlNet(ctx.remote, ctx.plane, step, spec.model)
        control = ControlSpec(
            control_latents=inputs["control_latents"],
            conditioning_scale=spec.conditioning_scale,
            residuals=remote_cn,
        )
        return control, remote_cn

    def _lora_set(self, choices: list[LoraChoice]) -> list[tuple[str, float]]:
        """[(adapter key, scale)] of the step's LoRAs, each key's file noted for the caches."""
        from shared.lora_registry import adapter_key
        from shared.zoo import lora_path
        from shared.zoo.registry import LORAS

        chosen = []
        for lora in choices:
            key = adapter_key(lora)
            if not lora.path:  # a built-in: this service's zoo has its file
                if lora.name not in LORAS or LORAS[lora.name].base != self.model_id:
                    raise BadStepInput(f"LoRA {lora.name!r} is not a LoRA of {self.model_id}")
                self._paths.setdefault(key, lora_path(lora.name, self.settings))
            elif self.settings.denoise_group_size > 1:  # a group's devices read built-ins from their zoo only
                raise BadStepInput(f"registered LoRA {lora.name!r}: not served by parallel groups yet; use a built-in")
            else:
                self._paths[key] = lora.path
            chosen.append((key, lora.scale))
        return chosen

    def _lora_source(self, key: str) -> Any:
        """What the device cache loads an adapter from: its tensors in the host cache."""
        return self.host.get(key, self._paths[key])

    def _activate(self, loras: list[tuple[str, float]]) -> None:
        """The batching engine's switch to a call's LoRAs (on its compute thread)."""
        self._drop_forgotten(loras)
        self.loras.activate_now(loras, self._lora_source)

    def _drop_forgotten(self, keep: list[tuple[str, float]]) -> None:
        """Delete the adapters of deleted LoRAs from the network, but those this call uses."""
        using = {key for key, _ in keep}
        for key in list(self._forgotten):
            if key not in using:
                self._forgotten.discard(key)
                self.loras.forget(key)

    def forget_lora(self, record: Any) -> None:
        """A LoRA was deleted from the registry (on the event loop): free its memory once no
        request holds it; the network drops its adapter at the next switch."""
        from shared.lora_registry import adapter_key

        if not record.sha256 or record.base != self.model_id:  # built-ins stay; another base's
            return
        key = adapter_key(record.choice(1.0))
        self.host.forget(key)
        self._forgotten.add(key)

    def prefetch(self, loras: list[LoraChoice]) -> None:
        """Start reading a planned request's LoRAs (the gateway's hint; on the event loop: returns at once)."""
        try:
            chosen = self._lora_set([lora for lora in loras if lora.path])  # built-ins: local and tiny
        except (ValueError, FileNotFoundError) as exc:
            log.warning("ignoring a LoRA prefetch hint: %s", exc)
            return
        for key, _ in chosen:
            self.host.prefetch(key, self._paths[key])

    def warm_up(self) -> None:
        from services.denoiser.denoise import denoise, warm_up_inputs
        from services.denoiser.loop import DenoiseInputs

        tensors = warm_up_inputs(self.bundle)
        denoise(
            self.bundle, DenoiseInputs(tensors, height=64, width=64, num_inference_steps=2, guidance_scale=5.0, seed=0)
        )

    def status(self) -> dict[str, Any]:
        devices = max(self.settings.denoise_group_size, 1)
        return {
            "param_bytes": param_bytes(self.bundle.transformer) * devices,  # a copy on each device of a group
            "group_devices": devices,
            "loras": sorted(self.loras.loaded()),
            "lora_bytes": self.loras.total_bytes(),
            "lora_host_bytes": self.host.total_bytes(),
        }

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        if self.host is not None:
            self.host.close()


def load(model_id: str, settings: Settings) -> DenoiserRunner:
    from services.denoiser.lora import LoraCache
    from services.denoiser.lora_host import HostLoraCache
    from shared import metrics
    from shared.coalesce import max_batch
    from shared.zoo import load_denoiser

    batch = max_batch(settings.denoise_max_batch, settings.device, gpu_default=2)
    metrics.GROUP_DEVICES.labels(model_id).set(max(settings.denoise_group_size, 1))
    if settings.denoise_group_size > 1:
        return _load_group(model_id, settings, batch)
    bundle = load_denoiser(model_id, settings)
    loras = LoraCache(
        bundle.transformer, int(settings.lora_cache_mb * 2**20), max_adapters=settings.lora_cache_max_adapters
    )
    host = HostLoraCache(max_bytes=int(settings.lora_host_cache_mb * 2**20))
    runner = DenoiserRunner(model_id=model_id, bundle=bundle, settings=settings, loras=loras, host=host)
    if batch > 1:
        from services.denoiser.batching import BatchEngine

        runner.engine = BatchEngine(
            bundle.transformer,
            batch,
            activate_loras=runner._activate,
            on_batch=metrics.StepMetrics(str(StepKind.DENOISE), model_id).batch.observe,
            name=f"batcher-{model_id}",
        )
        runner.concurrency = batch
    return runner


def _load_group(model_id: str, settings: Settings, batch: int) -> DenoiserRunner:
    """A replica over a group of devices (`group/`): `batch` requests per call on each device,
    as many requests in hand as the group's devices can batch."""
    from services.denoiser.group.engine import GroupEngine
    from services.denoiser.group.executor import GroupExecutor
    from services.denoiser.lora_host import HostLoraCache
    from shared import metrics
    from shared.zoo import load_denoiser

    executor = GroupExecutor(model_id, lambda: load_denoiser(model_id, settings), settings, settings.denoise_group_size)
    state = executor.state
    host = HostLoraCache(max_bytes=int(settings.lora_host_cache_mb * 2**20))
    runner = DenoiserRunner(model_id=model_id, bundle=state.bundle, settings=settings, loras=state.loras, host=host)
    degrees = metrics.DENOISE_DEGREE
    try:
        runner.engine = GroupEngine(
            executor,
            batch,
            mode=settings.parallel_mode,
            on_degree=lambda d: degrees.labels(model_id, str(d)).inc(),
            on_batch=metrics.StepMetrics(str(StepKind.DENOISE), model_id).batch.observe,
        )
    except ValueError:
        executor.close()
        raise
    runner.concurrency = batch * executor.world
    return runner


SPEC = ServiceSpec(
    name="denoiser",
    default_models=["sd3-transformer"],
    load=load,
    description="Denoiser service: runs the whole denoising loop of a request on a shared base model, "
    "applying the request's LoRAs and calling its ControlNet at every step; with LEGO_DENOISE_MAX_BATCH > 1 "
    "(default on a GPU: 2) requests share each transformer call, joining and leaving between steps.",
)
