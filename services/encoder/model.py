"""Text encoding for the encoder service: one model (CLIP-L, CLIP-G or T5) per bundle.

Why mirror diffusers line by line: the mesh's image must equal the pipelines', so these
functions reproduce `_get_clip_prompt_embeds` / `_get_t5_prompt_embeds` of
`StableDiffusion3Pipeline` and `FluxPipeline` (same tokenizer arguments, penultimate CLIP
hidden state, no T5 attention mask). The pipelines encode the prompt and the negative
prompt in separate batch-1 calls; we encode each text alone as well, because a batched
matmul may round differently from a batch-1 one.

One CLIP model serves both families: SD3 takes the penultimate hidden state ("embeds") and
the projected pooled output ("pooled" = `CLIPTextModelWithProjection.text_embeds`); Flux
takes CLIP-L's unprojected pooled output ("pooler" = `CLIPTextModel(...).pooler_output`).
SD1.5's `sd15-clip` (a `CLIPTextModel`, no projection) gives its last hidden state ("last" =
`CLIPTextModel(...)[0]`, as `StableDiffusionPipeline.encode_prompt` without clip skip).
All of them come from one `text_model` call, the very call both transformers classes make.
"""

from __future__ import annotations

from typing import Any

import torch

from shared.zoo import TextEncoderBundle

CLIP_MAX_LENGTH = 77  # the pipeline uses tokenizer (CLIP-L).model_max_length for both CLIPs


def _device(bundle: TextEncoderBundle) -> torch.device:
    return next(bundle.model.parameters()).device


CLIP_OUTPUTS = ("embeds", "pooled", "pooler", "last")


def default_clip_outputs(bundle: TextEncoderBundle) -> tuple[str, ...]:
    """What a CLIP gives when a step names no outputs: SD3's pair, or for a CLIP without a
    projection (SD1.5's `CLIPTextModel`, which has no "pooled") its last hidden state."""
    return ("embeds", "pooled") if hasattr(bundle.model, "text_projection") else ("last",)


def encode_clip(
    bundle: TextEncoderBundle,
    texts: list[str],
    outputs: str | tuple[str, ...] | list[str] = ("embeds", "pooled"),
    together: bool = False,
) -> dict[str, torch.Tensor]:
    """CLIP prompt embeddings, one row per text, for the names in `outputs`:
    "embeds" (n, 77, width) penultimate hidden state (SD3), "pooled" (n, projection_dim)
    projected pooled output (SD3), "pooler" (n, width) unprojected pooled output (Flux),
    "last" (n, 77, width) last hidden state (SD1.5).
    `together`: all texts in one call (batching several requests: equal up to float rounding)
    instead of one call per text (the pipelines' way, bit for bit)."""
    if bundle.kind != "clip":
        raise ValueError(f"{bundle.model_id} is a {bundle.kind} encoder, not clip")
    wanted = (outputs,) if isinstance(outputs, str) else tuple(outputs)
    if not wanted or any(o not in CLIP_OUTPUTS for o in wanted):
        raise ValueError(f"clip outputs must be among {CLIP_OUTPUTS}, got {list(wanted)}")
    device = _device(bundle)
    max_length = getattr(bundle.tokenizer, "model_max_length", CLIP_MAX_LENGTH)
    if not isinstance(max_length, int) or max_length > 10_000:  # "unbounded" sentinel in HF tokenizers
        max_length = CLIP_MAX_LENGTH
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in wanted}
    with torch.inference_mode():
        for chunk in [texts] if together else [[text] for text in texts]:
            ids = bundle.tokenizer(
                chunk, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
            ).input_ids
            # = CLIPTextModelWithProjection.forward, keeping the pooler output it would drop
            # (a CLIPTextModel, SD1.5's, is itself the text model: the pipeline's very call)
            text_model = getattr(bundle.model, "text_model", bundle.model)
            out = text_model(ids.to(device), output_hidden_states=True)
            if "embeds" in rows:
                rows["embeds"].append(out.hidden_states[-2].to(dtype=bundle.model.dtype, device=device))
            if "pooled" in rows:
                rows["pooled"].append(bundle.model.text_projection(out.pooler_output))
            if "pooler" in rows:
                rows["pooler"].append(out.pooler_output.to(dtype=bundle.model.dtype, device=device))
            if "last" in rows:
                rows["last"].append(out.last_hidden_state.to(dtype=bundle.model.dtype, device=device))
    return {name: torch.cat(tensors, dim=0) for name, tensors in rows.items()}


def encode_t5(
    bundle: TextEncoderBundle, texts: list[str], max_sequence_length: int = 256, together: bool = False
) -> dict[str, torch.Tensor]:
    """T5 prompt embeddings: {"embeds": (n, max_sequence_length, d_model)}; `together` as for CLIP."""
    if bundle.kind != "t5":
        raise ValueError(f"{bundle.model_id} is a {bundle.kind} encoder, not t5")
    device = _device(bundle)
    embeds = []
    with torch.inference_mode():
        for chunk in [texts] if together else [[text] for text in texts]:
            ids = bundle.tokenizer(
                chunk,
                padding="max_length",
                max_length=max_sequence_length,
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            ).input_ids
            out = bundle.model(ids.to(device))[0]
            embeds.append(out.to(dtype=bundle.model.dtype, device=device))
    return {"embeds": torch.cat(embeds, dim=0)}


def encode(
    bundle: TextEncoderBundle, texts: list[str], together: bool = False, **params: Any
) -> dict[str, torch.Tensor]:
    """Encode with whichever kind of model the bundle holds.

    params: for CLIP `outputs` (names among "embeds", "pooled", "pooler", "last"; default
    `default_clip_outputs`: SD3 and SD3.5 need ("embeds", "pooled"), Flux ("pooler",) from
    clip-l, SD1.5 ("last",) from sd15-clip);
    for T5 `max_sequence_length` (SD3/SD3.5: 256, Flux: 512; default 256).
    """
    if bundle.kind == "clip":
        outputs = params.get("outputs") or default_clip_outputs(bundle)
        return encode_clip(bundle, texts, outputs=outputs, together=together)
    if bundle.kind == "t5":
        length = int(params.get("max_sequence_length", 256))
        return encode_t5(bundle, texts, max_sequence_length=length, together=together)
    raise ValueError(f"unknown encoder kind {bundle.kind!r}")
