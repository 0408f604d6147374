"""The gateway's side of the LoRA registry: checking a LoRA file before it is registered,
storing uploads, and binding a request's LoRA names to registered files.

Why the check happens here, once: a denoiser that met a bad file mid-request could only fail
the request; the gateway refuses it at registration with a 400 that says what is wrong
(not safetensors, not the diffusers LoRA format, or fitting another base: named).
Uploads are stored by content (`<lora_dir>/<sha256>.safetensors`), so two names of one file
share it, and a deleted upload's file is removed only after `lora_delete_grace_s` (requests
planned before the delete may still be reading it) and only if no other name uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import tempfile
from pathlib import Path

from services.gateway.errors import APIError
from shared.bus import Bus
from shared.lora_files import LoraFileError, base_modules, lora_modules, misfit, read_header, weights_file
from shared.lora_registry import LoraRecord, LoraRegistry, lora_bases
from shared.messages import DenoiseParams, LoraChoice, StepKind, StepParams
from shared.settings import Settings
from shared.workflows.spec import WorkflowSpec
from shared.zoo.families import family
from shared.zoo.registry import family_of

log = logging.getLogger("lego.gateway.loras")


def upload_dir(settings: Settings) -> Path:
    return Path(settings.lora_dir or Path(settings.state_dir) / "loras").expanduser()


def _bad(message: str) -> APIError:
    return APIError(400, "invalid_lora", message)


def _base_dir(base: str, settings: Settings) -> Path:
    from shared.zoo.paths import family_dir

    fam = family_of(base)
    return family_dir(fam, settings) / family(fam).network_subfolder


def check_file(path: Path, base: str, settings: Settings) -> tuple[str, int]:
    """(sha256, size) of a LoRA file that fits `base`; APIError 400 naming what is wrong
    (for a LoRA of another base: which base it fits). Reads the whole file: call it in a thread."""
    if base not in lora_bases():
        raise _bad(f"base {base!r} takes no LoRAs here; bases: {', '.join(lora_bases())}")
    file = weights_file(path)
    try:
        modules = lora_modules(read_header(file))
    except LoraFileError as exc:
        raise _bad(f"{file.name}: {exc}") from None
    why = misfit(modules, base_modules(_base_dir(base, settings)))
    if why is not None:
        fits = [b for b in lora_bases() if b != base and misfit(modules, base_modules(_base_dir(b, settings))) is None]
        where = f"it fits {', '.join(fits)}" if fits else "it fits none of " + ", ".join(lora_bases())
        raise _bad(f"this LoRA does not fit {base} ({why}); {where}")
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest(), file.stat().st_size


def store_upload(data: bytes, settings: Settings) -> Path:
    """Write uploaded bytes to a temporary file in the upload directory (renamed once checked)."""
    directory = upload_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".upload-", suffix=".safetensors")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(tmp)


def keep_upload(tmp: Path, sha256: str, settings: Settings) -> Path:
    """Move a checked upload to its content address (a file of the same content is reused)."""
    final = upload_dir(settings) / f"{sha256}.safetensors"
    os.replace(tmp, final)
    return final


async def remove_later(record: LoraRecord, registry: LoraRegistry, grace_s: float) -> None:
    """Remove a deleted upload's file after `grace_s`, unless a live name uses it again."""
    await asyncio.sleep(grace_s)
    if any(r.path == record.path for r in registry.records()):
        return
    with contextlib.suppress(FileNotFoundError):
        Path(record.path).unlink()
        log.info("removed the file of deleted LoRA %s", record.name)


# -- requests: names to files ------------------------------------------------------------------


def bind(workflow: WorkflowSpec, registry: LoraRegistry) -> WorkflowSpec:
    """`workflow` accepting every LoRA the registry holds for its base (a `-lora` workflow; others as they are)."""
    if not workflow.loras:
        return workflow
    return workflow.model_copy(update={"loras": registry.names_for(denoiser_of(workflow))})


def denoiser_of(workflow: WorkflowSpec) -> str:
    return workflow.node_of_kind(StepKind.DENOISE).model


def resolve(
    workflow: WorkflowSpec, steps: dict[str, StepParams], registry: LoraRegistry
) -> list[tuple[str, list[LoraChoice]]]:
    """Give each denoise step's LoRAs their registered files (in place of `steps`); the
    (base model, LoRAs) to prefetch. A name deleted since admission is a 422."""
    prefetch = []
    models = {node.id: node.model for node in workflow.nodes}
    for node, params in steps.items():
        if not isinstance(params, DenoiseParams) or not params.loras:
            continue
        chosen = []
        for lora in params.loras:
            record = registry.get(lora.name)
            if record is None:
                raise APIError(422, "invalid_request", f"unknown LoRA {lora.name!r}: it was deleted just now")
            chosen.append(record.choice(lora.scale))
        steps[node] = params.model_copy(update={"loras": chosen})
        prefetch.append((models[node], chosen))
    return prefetch


async def publish_prefetch(bus: Bus, prefetch: list[tuple[str, list[LoraChoice]]]) -> None:
    """Hint each base's denoisers to read a planned request's LoRAs now (a lost hint costs only time)."""
    for model_id, chosen in prefetch:
        await bus.publish_lora_prefetch(model_id, chosen)
