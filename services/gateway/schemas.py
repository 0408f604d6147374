"""The REST contract: request and response bodies. The OpenAPI document is generated from these.

`POST /v1/images/generations` follows the OpenAI Images API shape; LegoDiffusion's extras
(workflow, steps, guidance, seed, negative prompt) sit beside the standard fields. Types are
strict: `"n": "2"` is an error, not a guess.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.gateway.encoding import DEFAULT_QUALITY, OutputFormat
from shared.workflows.catalogue import catalogue

# The limits of one request, stated here once: the schema enforces them and the OpenAPI
# document states them (a client, or a fuzzer, can read every rule there).
MAX_PROMPT_CHARS = 2000
# Every family's VAE works on an 8x grid; the MMDiT families need 16 (their 2x2 patches or
# packing): that rule is the family descriptor's, checked at admission once the workflow is known.
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 64, 1024, 8
MAX_IMAGES = 4
MAX_STEPS = 100
MIN_TIMEOUT_S = 1.0  # a shorter deadline no mesh can meet: the bus round trips alone take milliseconds
MAX_TIMEOUT_S = 3600.0
_SIZE = re.compile(r"([1-9][0-9]{1,3})x([1-9][0-9]{1,3})")  # ASCII digits only: int() reads others too


def size_pattern(multiple: int) -> str:
    """The regular expression of every size `parse_size` accepts whose sides are multiples of
    `multiple`: the OpenAPI document states the rule exactly, so a generated size is valid."""
    sides = [str(side) for side in range(MIN_SIDE, MAX_SIDE + 1) if side % multiple == 0]
    by_head: dict[str, list[str]] = {}
    for side in sides:
        by_head.setdefault(side[:-2], []).append(side[-2:])
    side = "|".join(f"{head}(?:{'|'.join(tails)})" if head else "|".join(tails) for head, tails in by_head.items())
    return f"^(?:{side})x(?:{side})$"


SIZE_PATTERN = size_pattern(SIDE_MULTIPLE)
AUTO_SIZE = "auto"  # OpenAI's: the size the workflow's models were trained at


def size_or_auto_pattern(multiple: int) -> str:
    """`size_pattern`, or `auto`."""
    return f"^(?:{AUTO_SIZE}|{size_pattern(multiple)[1:-1]})$"


SIZE_OR_AUTO = size_or_auto_pattern(SIDE_MULTIPLE)


def parse_size(size: str) -> tuple[int, int]:
    """'WxH' -> (width, height), within the bounds the models and the VAE's 8x grid allow."""
    m = _SIZE.fullmatch(size)
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
MAX_GUIDANCE = 30.0
MAX_USER_CHARS = 256  # the OpenAI-compatible extras below: accepted, unused, so kept short


def integral(value: object) -> object:
    """JSON has one number type: 2.0 is the integer 2 (as JSON Schema says), 2.5 is not one.
    Strings stay refused ("n": "2" is an error, not a guess)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _one_of(names: list[str]) -> dict[str, Any]:
    """The JSON schema of an optional name from a closed list (null: the server's choice)."""
    return {"anyOf": [{"type": "string", "enum": names}, {"type": "null"}]}


# The names the catalogue knows, stated as enums in the OpenAPI document. The gateway checks
# them itself (an unknown workflow is a 404 that lists the known ones, an unknown LoRA a 422),
# LoRAs are registered while the mesh runs: the per-workflow rules (openapi.py) list them live,
# so the document and the checks agree without the schema refusing first with a vaguer message.
WORKFLOWS = sorted(catalogue())
CONTROLNETS = sorted({m for w in catalogue().values() for m in w.controlnets})


class ControlNetInput(BaseModel):
    """The control image that guides a `*-controlnet` workflow at every denoising step."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = Field(
        None,
        description="ControlNet model id; default: the workflow's ControlNet",
        json_schema_extra=lambda s: s.update(_one_of(CONTROLNETS)),
    )
    image: str = Field(
        min_length=1,
        description="base64 PNG or JPEG of exactly the requested size; its header is read first, and an "
        "image of more pixels than the server's limit (LEGO_MAX_IMAGE_PIXELS, default 1048576) is refused "
        "before it is decoded",
    )
    conditioning_scale: float = Field(1.0, ge=0.0, le=MAX_CONDITIONING_SCALE, description="how strongly it guides")


class LoraInput(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    name: str = Field(
        min_length=1,
        max_length=64,
        description="a registered LoRA of the workflow's base model (GET /v1/loras, POST /v1/loras adds one); "
        "each named once",
    )
    scale: float = Field(1.0, ge=-LORA_SCALE, le=LORA_SCALE)


class OpenAIImageFields(BaseModel):
    """The fields of OpenAI's Images API (what the official SDK sends), shared by generations
    and edits. Each is accepted with a meaning here; a value these models cannot honour
    (`background: "transparent"`, `stream: true`, `output_format: "gif"`) is a 400 that names
    it, from `openai_fields.resolve`, not an unknown-field 422. A null is the default, as the
    SDK's `Optional` types allow."""

    model_config = ConfigDict(strict=True, extra="forbid")

    n: int | None = Field(1, ge=1, le=MAX_IMAGES, description=f"images to generate, 1-{MAX_IMAGES}")
    size: str | None = Field(
        "512x512",
        json_schema_extra={"anyOf": [{"type": "string", "pattern": SIZE_OR_AUTO}, {"type": "null"}]},
        description=f"WIDTHxHEIGHT: each side {MIN_SIDE}-{MAX_SIDE} and a multiple of 16 (sd3, sd35-large, flux) "
        f"or {SIDE_MULTIPLE} (sd15, sdxl); or `auto`: the size the workflow's models were trained at "
        "(1024x1024; 512x512 for sd15)",
    )
    response_format: Literal["b64_json", "url"] | None = Field(
        "b64_json",
        description="b64_json: images inline; url: a link to GET the image from this gateway, without an API key "
        "(the link's random token is the capability), for LEGO_IMAGE_URL_TTL_S seconds (default 3600)",
    )
    output_format: Literal["png", "jpeg", "webp", "gif", "svg"] | None = Field(
        "png",
        description="png (lossless), or jpeg / webp: much faster to encode and smaller; gif and svg are not "
        "drawn by these models (400)",
    )
    output_quality: int | None = Field(
        None, ge=1, le=100, description=f"jpeg / webp only: 1-100 (default {DEFAULT_QUALITY})"
    )
    output_compression: int | None = Field(
        None, ge=0, le=100, description="OpenAI's name for output_quality (0 is taken as 1); jpeg / webp only"
    )
    background: Literal["transparent", "opaque", "auto"] | None = Field(
        None, description="opaque or auto: these models draw opaque images; transparent is refused (400)"
    )
    moderation: Literal["low", "auto"] | None = Field(
        None, description="accepted, no effect: this gateway runs no content moderation (no safety checker)"
    )
    quality: str | None = Field(
        None, max_length=MAX_USER_CHARS, description="accepted, no effect: num_inference_steps sets the quality"
    )
    style: str | None = Field(None, max_length=MAX_USER_CHARS, description="accepted, no effect: say it in the prompt")
    complexity: Literal["low", "medium", "high"] | None = Field(None, description="accepted, no effect")
    safety_identifier: str | None = Field(
        None,
        max_length=MAX_USER_CHARS,
        description="your end user's id: accepted, not stored (usage is counted by API key)",
    )
    user: str | None = Field(None, max_length=MAX_USER_CHARS, description="deprecated name of safety_identifier")
    stream: bool | None = Field(
        None,
        description="false only: OpenAI's streamed partial images are not made (400); for progress send "
        "`wait: false` and follow `events_url`",
    )
    partial_images: int | None = Field(None, ge=0, le=3, description="0 only: no partial images are made (400)")
    frame_count: int | None = Field(None, ge=2, le=16, description="for gif output, which is not made (400)")
    frame_duration_ms: int | None = Field(None, ge=0, description="for gif output, which is not made (400)")
    svg: dict[str, Any] | None = Field(None, description="for svg output, which is not made (400)")

    @field_validator(
        "n", "output_quality", "output_compression", "partial_images", "frame_count", "frame_duration_ms", mode="before"
    )
    @classmethod
    def _integral(cls, value: object) -> object:
        return integral(value)

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None and value != AUTO_SIZE:
            parse_size(value)
        return value


class ImageGenerationRequest(OpenAIImageFields):
    """A generation request. Which fields a workflow takes depends on it: a `*-controlnet`
    workflow requires `controlnet` (every other refuses it), only `*-lora` workflows take `loras`
    (names of their base model's LoRAs), flux takes no `negative_prompt`, and sd3, sd35-large and
    flux need sizes in multiples of 16. The OpenAPI document states these as `if`/`then` rules."""

    model_config = ConfigDict(strict=True, extra="forbid")

    prompt: str = Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description=f"what to draw: 1-{MAX_PROMPT_CHARS} characters, not blank",
    )
    workflow: str | None = Field(
        None,
        description="catalogue workflow (GET /v1/workflows); default: the server's (sd3). An unknown one is a 404",
        json_schema_extra=lambda s: s.update(_one_of(WORKFLOWS)),
    )
    model: str | None = Field(
        None,
        description="OpenAI-compatible alias of `workflow` (used when `workflow` is absent)",
        json_schema_extra=lambda s: s.update(_one_of(WORKFLOWS)),
    )
    num_inference_steps: int = Field(28, ge=1, le=MAX_STEPS, description=f"denoising steps, 1-{MAX_STEPS}")
    guidance_scale: float = Field(7.0, ge=0.0, le=MAX_GUIDANCE)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="random when absent; echoed back")
    negative_prompt: str = Field(
        "", max_length=MAX_PROMPT_CHARS, description="what not to draw; not taken by flux (guidance-distilled)"
    )
    controlnet: ControlNetInput | None = Field(
        None, description="required by *-controlnet workflows, refused by the others"
    )
    loras: list[LoraInput] | None = Field(
        None,
        max_length=MAX_LORAS,
        description=f"for *-lora workflows only, at most {MAX_LORAS}, each named once; default: the workflow's "
        "default LoRA",
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
        ge=MIN_TIMEOUT_S,
        le=MAX_TIMEOUT_S,
        description=f"seconds this request may take, {MIN_TIMEOUT_S:g}-{MAX_TIMEOUT_S:g} (default: the server's, "
        "300); a request whose models already have more work queued than that is refused at once with 429 "
        "and Retry-After, one still running when it passes ends with 504 deadline_exceeded",
    )

    @field_validator("num_inference_steps", "seed", "priority", mode="before")
    @classmethod
    def _integral_extras(cls, value: object) -> object:
        return integral(value)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is blank: describe the image to generate")
        return value


class ImageData(BaseModel):
    """One image: inline (`b64_json`) or as a link (`url`), as the request's response_format asked."""

    b64_json: str | None = None
    url: str | None = Field(None, description="absolute; GET it without an API key until it expires")


class ImageGenerationResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: OutputFormat = Field("png", description="the format of every image in `data`")
    size: str = Field("", description="WIDTHxHEIGHT of the images (what `size: auto` chose)")
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
    lora_bytes: int = Field(0, description="their parameters' bytes (its device cache)")
    lora_host_bytes: int = Field(0, description="bytes of LoRA files it holds read in host memory")
    batch_size: int = Field(1, description="steps it computes together at most (1: no batching)")
    group_devices: int = Field(1, description="devices its parallel group owns (1: a single-device replica)")


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
