"""The one message schema module: everything that crosses the bus is defined here.

Messages are small JSON documents. Bulk data never rides in them: a `TensorRef` points at the
producer's tensor store, and only tensors below the inline threshold carry their bytes (base64).
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, StringConstraints, model_validator


class StepKind(StrEnum):
    """What a step asks a model service to do; also the second token of its subject."""

    ENCODE = "encode"
    DENOISE = "denoise"
    CONTROLNET = "controlnet"
    VAE_DECODE = "vae_decode"
    VAE_ENCODE = "vae_encode"


# A step's kind as it travels: one of the mesh's `StepKind`s, or a kind that a program built on
# this library defines for services of its own (any subject token; the bus, the worker and
# presence treat it alike). StepKind is tried first, so the mesh's kinds arrive as its members.
AnyStepKind = Annotated[
    StepKind | Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]+$")],
    Field(union_mode="left_to_right"),
]


# Input-name prefixes of a `controlnet` step: tensors fixed for the whole request (uploaded once,
# pulled once per request by the adapters service) and tensors of this denoising step.
CONSTANT_INPUT, VARYING_INPUT = "c.", "v."


class TensorRef(BaseModel):
    """A pointer to a tensor held by its producer.

    The consumer pulls the bytes from `uri` (or reads `inline`) and rebuilds the tensor from
    `dtype` and `shape`; nothing is ever unpickled. `token` is checked by the producer on read.
    """

    key: str
    dtype: str
    shape: list[int]
    nbytes: int
    token: str = ""
    uri: str | None = None  # e.g. "tcp://127.0.0.1:40123"; None when inline
    host: str = ""  # producer's host identity: same host enables the shm transport
    device: str = "cpu"
    inline: str | None = None  # base64 of the raw bytes, for tiny tensors
    ucx_uri: str | None = None  # e.g. "ucx://127.0.0.1:40124" when the producer offers UCX


class ErrorInfo(BaseModel):
    """A typed error: `code` is machine-readable, `message` says what was wrong and what to do."""

    code: str
    message: str
    retryable: bool = False
    lost_inputs: list[str] = Field(default_factory=list)  # inputs whose producer no longer has them


class StepParamsModel(BaseModel):
    """Step parameters: strict (`"2"` is not 2, `true` is not 1) and closed (a misspelt name is an
    error, not a silently ignored default). Built and validated once, at the gateway's planning.
    One subclass per step kind (`PARAMS_OF_KIND`)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class LoraChoice(StepParamsModel):
    """A LoRA to switch on for a request, at `scale`."""

    name: str
    scale: float = 1.0
    # A registered LoRA's file and SHA-256 (shared.lora_registry); empty for the zoo's built-ins.
    path: str = ""
    sha256: str = ""


class ControlNetChoice(StepParamsModel):
    """The ControlNet guiding a request's denoising, and how strongly."""

    model: str
    conditioning_scale: float = 1.0


class EncodeParams(StepParamsModel):
    """Encode the prompt (row 0) and, with `negative`, the negative prompt (row 1: classifier-free
    guidance needs both; guidance-distilled families read the prompt only)."""

    prompt: str
    negative_prompt: str | None = None
    negative: bool = True
    outputs: list[str] | None = None  # CLIP outputs wanted; None: the encoder's default
    max_sequence_length: int | None = Field(None, ge=1)  # T5 only


class DenoiseParams(StepParamsModel):
    """A request's whole denoising loop. `negative_prompt` is read by families whose loop needs
    the text itself (SDXL: an empty one means zero embeddings)."""

    height: int = Field(ge=8)
    width: int = Field(ge=8)
    num_inference_steps: int = Field(ge=1)
    guidance_scale: float
    seed: int = Field(ge=0)
    n: int = Field(1, ge=1)
    negative_prompt: str | None = None
    controlnet: ControlNetChoice | None = None
    loras: list[LoraChoice] = Field(default_factory=list)
    # An edit (image-to-image, inpainting): how far the request's image is noised before
    # denoising, as the diffusers img2img / inpaint pipelines' `strength`; None: text-to-image.
    strength: float | None = Field(None, gt=0.0, le=1.0)


class ControlNetParams(StepParamsModel):
    """One denoising step's ControlNet call. `cache_inputs`: inputs constant for the request,
    which the adapters service pulls once and keeps (see `CONSTANT_INPUT`)."""

    conditioning_scale: float
    step: int = Field(ge=0)
    num_steps: int = Field(ge=1)
    cache_inputs: list[str] = Field(default_factory=list)


class VaeDecodeParams(StepParamsModel):
    """Decoding needs nothing but the latents: the VAE's config holds its factors."""


class VaeEncodeParams(StepParamsModel):
    """An image to latents. `purpose` "control": a control image to ControlNet latents, as the
    family's ControlNet pipeline prepares them (same size, seed, images per prompt and guidance
    as the request); "image": an edit's input image (and its mask, when inpainting) to the
    image latents (and latent-size mask) the img2img / inpaint pipelines start from."""

    family: str
    height: int = Field(ge=8)
    width: int = Field(ge=8)
    seed: int = Field(ge=0)
    n: int = Field(1, ge=1)
    guidance_scale: float = 0.0
    purpose: Literal["control", "image"] = "control"


StepParams = EncodeParams | DenoiseParams | ControlNetParams | VaeDecodeParams | VaeEncodeParams

# The params model of each kind. A program that defines a kind of its own (see `AnyStepKind`)
# registers its model with `register_params`.
PARAMS_OF_KIND: dict[str, type[StepParamsModel]] = {
    StepKind.ENCODE: EncodeParams,
    StepKind.DENOISE: DenoiseParams,
    StepKind.CONTROLNET: ControlNetParams,
    StepKind.VAE_DECODE: VaeDecodeParams,
    StepKind.VAE_ENCODE: VaeEncodeParams,
}


def register_params(kind: str, model: type[StepParamsModel]) -> None:
    """Declare the params model of a step kind that is not one of the mesh's `StepKind`s."""
    if kind in PARAMS_OF_KIND and PARAMS_OF_KIND[kind] is not model:
        raise ValueError(f"step kind {kind!r} already has params {PARAMS_OF_KIND[kind].__name__}")
    PARAMS_OF_KIND[kind] = model


class StepRequest(BaseModel):
    """One model-execution node of one request, as published on `lego.step.<kind>.<model>`.

    `params` is the typed model of its kind (`PARAMS_OF_KIND`); a dict (as JSON brings it) is
    validated into that model, so a service receives `step.params.height`, never a guess."""

    request_id: str
    node_id: str
    kind: AnyStepKind
    model_id: str
    params: SerializeAsAny[StepParamsModel]
    inputs: dict[str, TensorRef] = Field(default_factory=dict)
    reply_to: str  # the gateway's result subject
    progress_to: str | None = None  # where long steps report progress (core NATS, best effort)
    deadline: float  # unix time after which the result is useless
    attempt: int = 1
    owner: str = ""  # who the outputs are held for (released by that name); default: request_id
    # The request's priority (0-9): picks the step's band (`subjects.band_of`), kept by re-plans
    # and retries, and passed on to the steps this one calls (ControlNet).
    priority: int = Field(0, ge=0, le=9)

    @model_validator(mode="before")
    @classmethod
    def _params_of_kind(cls, data: Any) -> Any:
        """Parse `params` as the model of the step's kind (a union alone cannot tell them apart)."""
        if isinstance(data, dict):
            kind = data.get("kind")
            model = PARAMS_OF_KIND.get(kind) if isinstance(kind, str) else None
            if model is None:
                raise ValueError(f"step kind {kind!r} has no params model; known: {', '.join(PARAMS_OF_KIND)}")
            if not isinstance(data.get("params"), model):
                data = {**data, "params": model.model_validate(data.get("params") or {})}
        return data

    @property
    def output_owner(self) -> str:
        return self.owner or self.request_id

    def expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) > self.deadline


class StepEnvelope(BaseModel):
    """Who to answer for a step, read even when the rest of it does not parse (params of the
    wrong type, a kind without a params model): the worker then answers an error instead of
    leaving the request to wait for its deadline."""

    request_id: str
    node_id: str
    reply_to: str
    attempt: int = 1


class StepResult(BaseModel):
    """What a service answers for a step: outputs as TensorRefs, or an error."""

    request_id: str
    node_id: str
    ok: bool
    attempt: int = 1  # the step attempt this answers; the gateway ignores stale attempts
    outputs: dict[str, TensorRef] = Field(default_factory=dict)
    error: ErrorInfo | None = None
    replica_id: str = ""
    compute_s: float = 0.0
    queue_wait_s: float = 0.0


class StepProgress(BaseModel):
    """Best-effort progress of a long step (the denoising loop), for users watching a request."""

    request_id: str
    node_id: str
    step: int
    total: int
    replica_id: str = ""


class ReleaseTensors(BaseModel):
    """Broadcast when a request ends so every producer frees what it holds for it."""

    request_id: str


class ReplicaInfo(BaseModel):
    """What a live model replica announces in the presence bucket (refreshed; expires on death)."""

    replica_id: str
    kind: AnyStepKind
    model_id: str
    host: str
    pid: int
    device: str = "cpu"
    tensor_uri: str = ""
    started_at: float = 0.0
    steps_done: int = 0
    busy: bool = False
    param_bytes: int = 0  # memory the model's parameters take (on all its devices, for a parallel group)
    group_devices: int = 1  # devices this replica's parallel group owns (services/denoiser/group/)
    loras: list[str] = Field(default_factory=list)  # LoRA adapters loaded into this replica's base model
    lora_bytes: int = 0  # their parameters (the device cache)
    lora_host_bytes: int = 0  # LoRA files it holds read in host memory (the host cache)
    tensors_held: int = 0  # tensors its tensor plane holds for requests now (0 when idle: all freed)
    tensor_bytes_held: int = 0
    seconds_per_item: float = 0.0  # measured: moving average of one step's compute time here (0: none yet)
    batch_size: int = 1  # steps this replica handles at once
    rss_bytes: int = 0  # the replica process's resident memory
    metrics_url: str = ""  # its Prometheus endpoint, e.g. "http://10.0.0.5:40125/metrics"


class UnitScale(BaseModel):
    """The autoscaler's view of one unit (a process kind hosting some models) at its last tick."""

    unit: str
    models: list[str]
    replicas: int  # what the actuator runs now (starting ones included)
    live: int  # replicas announcing themselves in the presence bucket
    desired: int  # what the policy asks for
    min_replicas: int
    max_replicas: int
    backlog: int  # num_pending + num_ack_pending over the unit's consumers
    arrival_rate: float  # steps per second arriving, over the rate window
    seconds_per_item: float  # measured step time (or the default before any was measured)
    memory_bytes: int  # one replica's memory, as the budget counts it
    reason: str


class ScalingDecision(BaseModel):
    """One change of a unit's replica count, with the numbers that led to it."""

    at: float
    unit: str
    from_replicas: int
    to_replicas: int
    reason: str


class AutoscalerStatus(BaseModel):
    """What the autoscaler publishes each tick (a key with a TTL: gone when it is)."""

    at: float
    actuator: str
    slo: str
    units: list[UnitScale] = Field(default_factory=list)
    decisions: list[ScalingDecision] = Field(default_factory=list)  # the latest changes, oldest first
