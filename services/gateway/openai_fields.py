"""What the OpenAI Images API's fields mean here, in one place: generations and edits both turn
a body's `OpenAIImageFields` into the size, count, encoding and delivery the gateway uses.

Why one place: the official SDK sends these fields to both routes, and a user expects the same
answer from both. Every field the SDK documents is accepted; a value these models cannot honour
is refused with a 400 `unsupported_value` that names the field and what to send instead, never
an unknown-field 422. The fields that change nothing here, and why:
- `moderation` ("low" | "auto"): no content moderation runs in this gateway (no safety checker).
- `quality`, `style`, `complexity`: the result is set by `num_inference_steps`, `guidance_scale`
  and the prompt; these would only be guessed from.
- `safety_identifier` (and its older name `user`): the end user's id; not stored, since usage is
  counted by API key (LEGO keeps no per-end-user records).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from services.gateway.encoding import DEFAULT_QUALITY, ImageEncoding, OutputFormat
from services.gateway.errors import APIError
from services.gateway.schemas import AUTO_SIZE, OpenAIImageFields, parse_size
from shared.workflows.spec import WorkflowSpec
from shared.zoo.families import family

ResponseFormat = Literal["b64_json", "url"]
DEFAULT_SIZE = "512x512"  # a body with `size: null`, as one with no size (the schema's default)
DRAWN_FORMATS: tuple[OutputFormat, ...] = ("png", "jpeg", "webp")


@dataclass(frozen=True)
class Resolved:
    """What the OpenAI fields of a request come to: how many images of which size, how they
    are encoded, and whether they come inline or as links."""

    n: int
    width: int
    height: int
    encoding: ImageEncoding
    response_format: ResponseFormat


def unsupported(name: str, value: object, why: str, instead: str) -> APIError:
    """A 400 for a documented field whose value cannot be honoured: it names the field, the
    value, why, and what to send instead."""
    return APIError(400, "unsupported_value", f"{name}={value!r} is not supported: {why}; {instead}")


def resolve(fields: OpenAIImageFields, workflow: WorkflowSpec) -> Resolved:
    """The request's OpenAI fields for `workflow`, or APIError: 400 for a value these models
    cannot honour or two fields that disagree, 422 for a quality with png (as output_quality)."""
    refuse_unsupported(fields)
    fmt = fields.output_format or "png"
    assert fmt in DRAWN_FORMATS  # refuse_unsupported refused the others
    width, height = _size(fields.size, workflow)
    return Resolved(
        n=fields.n or 1,
        width=width,
        height=height,
        encoding=ImageEncoding(fmt, _quality(fields, fmt)),
        response_format=fields.response_format or "b64_json",
    )


def refuse_unsupported(fields: OpenAIImageFields) -> None:
    """400 for the first field whose value no model here can honour."""
    if fields.background == "transparent":
        raise unsupported(
            "background",
            "transparent",
            "these models draw opaque RGB images, with no alpha channel",
            "send background='opaque' or 'auto', or omit it",
        )
    if fields.output_format in ("gif", "svg"):
        raise unsupported(
            "output_format", fields.output_format, "these models draw one raster image", "send png, jpeg or webp"
        )
    for name in ("frame_count", "frame_duration_ms", "svg"):
        value = getattr(fields, name)
        if value is not None:
            kind = "svg" if name == "svg" else "gif"
            raise unsupported(name, value, f"it is for output_format='{kind}', which is not made here", "omit it")
    if fields.stream:
        raise unsupported(
            "stream",
            True,
            "OpenAI's streamed partial images are not made here",
            "send stream=false (or omit it); for progress send wait=false and follow the answer's events_url",
        )
    if fields.partial_images:
        raise unsupported(
            "partial_images", fields.partial_images, "no partial images are made here", "send 0, or omit it"
        )


def _size(size: str | None, workflow: WorkflowSpec) -> tuple[int, int]:
    """(width, height): `auto` is the side the workflow's models were trained at, square."""
    if size == AUTO_SIZE:
        side = family(workflow.family).default_side
        return side, side
    return parse_size(size or DEFAULT_SIZE)


def _quality(fields: OpenAIImageFields, fmt: OutputFormat) -> int:
    """The lossy formats' quality: `output_quality`, or OpenAI's `output_compression` (the same
    setting; 0 is taken as 1, the lowest JPEG quality). Both, with different values, is a 400."""
    ours, theirs = fields.output_quality, fields.output_compression
    if ours is not None and theirs is not None and ours != theirs:
        raise APIError(
            400,
            "conflicting_fields",
            f"output_compression={theirs} and output_quality={ours} disagree: they are the same setting "
            "(OpenAI's name and ours); send one of them",
        )
    given = "output_quality" if ours is not None else "output_compression" if theirs is not None else None
    if given is not None and fmt == "png":
        raise APIError(422, "invalid_request", f"{given} applies to jpeg and webp only; png is lossless")
    quality = ours if ours is not None else theirs
    return DEFAULT_QUALITY if quality is None else max(quality, 1)
