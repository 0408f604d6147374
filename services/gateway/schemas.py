"""The REST contract: request and response bodies. The OpenAPI document is generated from these.

`POST /v1/images/generations` follows the OpenAI Images API shape; LegoDiffusion's extras
(workflow, steps, guidance, seed, negative prompt) sit beside the standard fields. Types are
strict: `"n": "2"` is an error, not a guess.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.gateway.encoding import DEFAULT_QUALITY, OutputFormat

MAX_PROMPT_CHARS = 2000
# Every family's VAE works on an 8x grid; the MMDiT families need 16 (their 2x2 patches or
# packing): that rule is the family descriptor's, checked at admission once the workflow is known.
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 64, 1024, 8
MAX_IMAGES = 4
MAX_STEPS = 100
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_size(size: str) -> tuple[int, int]:
    """'WxH' -> (width, height), within the bounds the models and the VAE's 8x grid allow."""
    m = _SIZE.match(size)
    if not m:
        raise ValueError(f"size must look like 'WIDTHxHEIGHT', e.g. '512x512'; got {size!r}")
    width, height = int(m.group(1)), int(m.group(2))
    for side in (width, height):
        if side % SIDE_MULTIPLE:
            raise ValueError(f"size sides must be multiples of {SIDE_MULTIPLE}; got {size!r}")
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise ValueError(f"size sides must be between {MIN_SIDE} and {MAX_SIDE}; got {size!r}")
    return width, height


MAX_LORAS = 4
MAX_PRIORITY = 9
LORA_SCALE = 2.0  # |scale| above this is almost always a typo (100 for 1.00) and wrecks the image
MAX_CONDITIONING_SCALE = 2.0


class ControlNetInput(BaseModel):
    """The control image that guides a `*-controlnet` workflow at every denoising step."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = Field(None, description="ControlNet model id; default: the workflow's ControlNet")
    image: str = Field(min_length=1, description="base64 PNG or JPEG of exactly the requested size")
    conditioning_scale: float = Field(1.0, ge=0.0, le=MAX_CONDITIONING_SCALE, description="how strongly it guides")


class LoraInput(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    name: str = Field(min_length=1, description="a LoRA of the workflow's base model (see GET /v1/workflows)")
    scale: float = Field(1.0, ge=-LORA_SCALE, le=LORA_SCALE)


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="what to draw")
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="images to generate")
    size: str = Field(
        "512x512", description="WIDTHxHEIGHT, 64..1024, multiples of 16 (sd3, sd35-large, flux) or 8 (sd15, sdxl)"
    )
    response_format: Literal["b64_json"] = Field("b64_json", description="only b64_json: images come inline")
    output_format: OutputFormat = Field(
        "png", description="png (lossless), or jpeg / webp: much faster to encode and smaller"
    )
    output_quality: int | None = Field(
        None, ge=1, le=100, description=f"jpeg / webp only: 1-100 (default {DEFAULT_QUALITY})"
    )
    workflow: str | None = Field(None, description="catalogue workflow; default from the server (sd3)")
    model: str | None = Field(None, description="OpenAI-compatible alias of `workflow`")
    num_inference_steps: int = Field(28, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(7.0, ge=0.0, le=30.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="random when absent; echoed back")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    controlnet: ControlNetInput | None = Field(None, description="required by *-controlnet workflows")
    loras: list[LoraInput] | None = Field(
        None, max_length=MAX_LORAS, description="for *-lora workflows; default: the workflow's default LoRA"
    )
    priority: int = Field(
        0,
        ge=0,
        le=MAX_PRIORITY,
        description=f"0 (default) to {MAX_PRIORITY}: higher is served first by admission and every model's "
        "queue, lower is never starved; at most the API key's max priority",
    )
    wait: bool = Field(True, description="false: answer 202 at once with the request id (async mode)")
    timeout_s: float | None = Field(
        None,
        gt=0,
        le=3600,
        description="seconds this request may take (default: the server's, 300); a request whose models "
        "already have more work queued than that is refused at once with 429 and Retry-After",
    )
    # Accepted for OpenAI client compatibility; they do not change the result.
    user: str | None = None
    quality: str | None = None
    style: str | None = None

    @field_validator("size")
    @classmethod
    def _size(cls, value: str) -> str:
        parse_size(value)
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is blank: describe the image to generate")
        return value


class ImageData(BaseModel):
    b64_json: str


class ImageGenerationResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: OutputFormat = Field("png", description="the format of every image in `data`")
    request_id: str
    seed: int
    workflow: str


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class NodeInfo(BaseModel):
    id: str
    kind: str
    model: str
    inputs: dict[str, str]


class WorkflowInfo(BaseModel):
    name: str
    description: str
    family: str
    models: list[str]
    nodes: list[NodeInfo]
    controlnets: list[str] = Field(default_factory=list, description="accepted `controlnet.model` ids")
    loras: list[str] = Field(default_factory=list, description="accepted LoRA names")
    default_loras: list[LoraInput] = Field(default_factory=list)


class ReplicaSummary(BaseModel):
    replica_id: str
    host: str
    pid: int
    device: str
    busy: bool
    steps_done: int
    param_bytes: int = 0
    metrics_url: str = ""
    tensors_held: int = 0
    loras: list[str] = Field(default_factory=list, description="LoRA adapters this replica holds loaded")
    batch_size: int = Field(1, description="steps it computes together at most (1: no batching)")


class ModelInfo(BaseModel):
    model_id: str
    kinds: list[str] = Field(description="step kinds it serves, e.g. vae_decode and vae_encode")
    role: str
    service: str
    description: str
    replicas: list[ReplicaSummary]
    workflows: list[str] = Field(description="catalogue workflows that use this model")


class ModelList(BaseModel):
    models: list[ModelInfo]


class WorkflowList(BaseModel):
    default: str
    workflows: list[WorkflowInfo]


class AsyncAccepted(BaseModel):
    request_id: str
    status: Literal["running"]
    seed: int
    workflow: str
    status_url: str
    events_url: str = Field(description="server-sent events: queued, node, progress, then result or error")


class RequestStatus(BaseModel):
    request_id: str
    workflow: str
    status: Literal["running", "succeeded", "failed", "cancelled"]
    nodes: dict[str, str]
    replicas: dict[str, str] = Field(default_factory=dict, description="node -> replica that ran it")
    compute_s: dict[str, float] = Field(default_factory=dict, description="node -> seconds spent in the model")
    wall_s: dict[str, float] = Field(default_factory=dict, description="node -> seconds from publish to result")
    step: int = 0
    total_steps: int = 0
    queue_position: int = Field(0, description="requests ahead of it for its base model (0: being served)")
    elapsed_s: float
    error: ErrorBody | None = None
    data: list[ImageData] = Field(default_factory=list, description="the images, once done (kept for recent ones)")
    seed: int | None = None
