"""Text encoding for the encoder service: one model (CLIP-L, CLIP-G or T5) per bundle.

Why mirror diffusers line by line: the mesh's image must equal `StableDiffusion3Pipeline`'s,
so these functions reproduce `_get_clip_prompt_embeds` / `_get_t5_prompt_embeds` (same
tokenizer arguments, penultimate CLIP hidden state, no T5 attention mask). The pipeline
encodes the prompt and the negative prompt in two separate batch-1 calls; we encode each
text alone as well, because a batched matmul may round differently from a batch-1 one.
"""

from __future__ import annotations

from typing import Any

import torch

from shared.zoo import TextEncoderBundle

CLIP_MAX_LENGTH = 77  # the pipeline uses tokenizer (CLIP-L).model_max_length for both CLIPs


def _device(bundle: TextEncoderBundle) -> torch.device:
    return next(bundle.model.parameters()).device


def encode_clip(bundle: TextEncoderBundle, texts: list[str]) -> dict[str, torch.Tensor]:
    """CLIP prompt embeddings: {"embeds": (n, 77, width), "pooled": (n, projection_dim)}."""
    if bundle.kind != "clip":
        raise ValueError(f"{bundle.model_id} is a {bundle.kind} encoder, not clip")
    device = _device(bundle)
    max_length = getattr(bundle.tokenizer, "model_max_length", CLIP_MAX_LENGTH)
    if not isinstance(max_length, int) or max_length > 10_000:  # "unbounded" sentinel in HF tokenizers
        max_length = CLIP_MAX_LENGTH
    embeds, pooled = [], []
    with torch.inference_mode():
        for text in texts:
            ids = bundle.tokenizer(
                [text], padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
            ).input_ids
            out = bundle.model(ids.to(device), output_hidden_states=True)
            pooled.append(out[0])
            embeds.append(out.hidden_states[-2].to(dtype=bundle.model.dtype, device=device))
    return {"embeds": torch.cat(embeds, dim=0), "pooled": torch.cat(pooled, dim=0)}


def encode_t5(bundle: TextEncoderBundle, texts: list[str], max_sequence_length: int = 256) -> dict[str, torch.Tensor]:
    """T5 prompt embeddings: {"embeds": (n, max_sequence_length, d_model)}."""
    if bundle.kind != "t5":
        raise ValueError(f"{bundle.model_id} is a {bundle.kind} encoder, not t5")
    device = _device(bundle)
    embeds = []
    with torch.inference_mode():
        for text in texts:
            ids = bundle.tokenizer(
                [text],
                padding="max_length",
                max_length=max_sequence_length,
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            ).input_ids
            out = bundle.model(ids.to(device))[0]
            embeds.append(out.to(dtype=bundle.model.dtype, device=device))
    return {"embeds": torch.cat(embeds, dim=0)}


def encode(bundle: TextEncoderBundle, texts: list[str], **params: Any) -> dict[str, torch.Tensor]:
    """Encode with whichever kind of model the bundle holds (params: max_sequence_length for T5)."""
    if bundle.kind == "clip":
        return encode_clip(bundle, texts)
    if bundle.kind == "t5":
        return encode_t5(bundle, texts, max_sequence_length=int(params.get("max_sequence_length", 256)))
    raise ValueError(f"unknown encoder kind {bundle.kind!r}")
