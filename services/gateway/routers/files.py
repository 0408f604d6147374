"""`GET /v1/images/files/{file_id}`: the images answered as links (`response_format: "url"`).

Public (no API key): the link's random token is the capability, as with OpenAI's and SGLang's
links; why, and how they are kept, is in `image_files`."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from services.gateway.deps import ImageFilesDep
from services.gateway.image_files import FILES_PATH, MEDIA_TYPES
from services.gateway.schemas import ErrorResponse

router = APIRouter()


@router.get(
    f"{FILES_PATH}/{{file_id}}",
    response_class=Response,
    responses={
        200: {"content": {t: {} for t in MEDIA_TYPES.values()}, "description": "the image"},
        404: {"model": ErrorResponse, "description": "no such image: the message says whether the link expired"},
    },
)
async def image_file(file_id: str, files: ImageFilesDep) -> Response:
    """An image a generation answered as a link, until the link expires (LEGO_IMAGE_URL_TTL_S,
    default an hour). No API key needed: the link itself is the secret; share it as such."""
    stored = files.get(file_id)
    headers = {
        "Cache-Control": f"private, max-age={stored.max_age(files.clock())}",
        "X-Content-Type-Options": "nosniff",
    }
    return Response(stored.data, media_type=stored.media_type, headers=headers)
