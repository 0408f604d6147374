"""Sequence parallelism inside an MMDiT (SD3, SD3.5) or Flux transformer: each of s devices
holds 1/s of the image tokens; attention is the only place a token sees the others.

Why gather keys and values (rather than Ulysses' all-to-all over heads): it needs no head
count divisible by s (the tiny test models have 2 heads), it keeps the library's own
projections, norms and rotary embedding untouched, and its volume per layer (the other
devices' image K and V) is of the order of Ulysses' four all-to-alls at s = 2 to 4. Text tokens
are not split: every device computes them alike (they are few: 77 + 256 for SD3, 512 for
Flux), and the queries of the text attend to the gathered keys, so every device's text stream
stays identical to the unsplit one.

Per call, `shard(...)` sets the calling thread's `SeqShard`; without one, every processor
and hook here does exactly what the model did before they were installed, so the same loaded
model serves split and unsplit calls side by side.

* SD3/SD3.5 (`SD3Transformer2DModel`): the tokens are split after the patch embedding (a hook
  on `pos_embed`: the embedding needs the whole latent image for its positions) and gathered
  before `norm_out`; the joint attention processor gathers image K/V (image first, then text).
* Flux (`FluxTransformer2DModel`): the tokens arrive split (the caller splits `hidden_states`
  and `img_ids`, so the rotary embedding is the shard's own); gathered before `norm_out`; the
  processor gathers image K/V after the rotary embedding (text first, then image; in the
  single-stream blocks the text length comes from the `SeqShard`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

_local = threading.local()


@dataclass(frozen=True)
class SeqShard:
    """This device's part of a sequence-parallel call: `index` of `size` shards, the process
    `group` of the shards' devices, and the prompt's token count (Flux's single blocks)."""

    index: int
    size: int
    group: Any  # torch.distributed.ProcessGroup
    text_len: int = 0


@contextmanager
def shard(current: SeqShard | None) -> Iterator[None]:
    """Run the enclosed transformer call as `current`'s shard (None: unsplit)."""
    before = getattr(_local, "shard", None)
    _local.shard = current
    try:
        yield
    finally:
        _local.shard = before


def active() -> SeqShard | None:
    return getattr(_local, "shard", None)


def gather(t: torch.Tensor, dim: int, sp: SeqShard) -> torch.Tensor:
    """Every shard's `t`, concatenated along `dim` in shard order."""
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(sp.size)]
    dist.all_gather(parts, t, group=sp.group)
    return torch.cat(parts, dim=dim)


def take(t: torch.Tensor, dim: int, index: int, size: int) -> torch.Tensor:
    """Shard `index` of `size` equal shards of `t` along `dim`."""
    if t.shape[dim] % size:
        raise ValueError(f"{t.shape[dim]} tokens do not split into {size} equal shards")
    return t.chunk(size, dim=dim)[index]


# -- the processors --------------------------------------------------------------------------------


class JointAttnSeqParallel:
    """SD3's joint attention (`JointAttnProcessor2_0`), the image keys and values gathered
    from every shard when a `SeqShard` is active; the wrapped processor otherwise."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None, *args, **kwargs):
        sp = active()
        if sp is None or encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        batch, own = hidden_states.shape[0], hidden_states.shape[1]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (
            heads(attn.to_q(hidden_states)),
            heads(attn.to_k(hidden_states)),
            heads(attn.to_v(hidden_states)),
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        c_query = heads(attn.add_q_proj(encoder_hidden_states))
        c_key = heads(attn.add_k_proj(encoder_hidden_states))
        c_value = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            c_query = attn.norm_added_q(c_query)
        if attn.norm_added_k is not None:
            c_key = attn.norm_added_k(c_key)
        query = torch.cat([query, c_query], dim=2)
        key = torch.cat([gather(key, 2, sp), c_key], dim=2)
        value = torch.cat([gather(value, 2, sp), c_value], dim=2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1]).to(query.dtype)
        image, context = out[:, :own], out[:, own:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        image = attn.to_out[1](attn.to_out[0](image))
        return image, context


class FluxAttnSeqParallel:
    """Flux's attention (`FluxAttnProcessor`), the image keys and values (after the rotary
    embedding) gathered from every shard when a `SeqShard` is active; the wrapped one otherwise."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._attention_backend = getattr(inner, "_attention_backend", None)
        self._parallel_config = None

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ):
        sp = active()
        if sp is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, e_query, e_key, e_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            e_query, e_key, e_value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (e_query, e_key, e_value))
            e_query, e_key = attn.norm_added_q(e_query), attn.norm_added_k(e_key)
            query = torch.cat([e_query, query], dim=1)
            key = torch.cat([e_key, key], dim=1)
            value = torch.cat([e_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        text = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else sp.text_len
        key = torch.cat([key[:, :text], gather(key[:, text:], 1, sp)], dim=1)
        value = torch.cat([value[:, :text], gather(value[:, text:], 1, sp)], dim=1)
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        context, image = out.split_with_sizes([text, out.shape[1] - text], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(context.contiguous())


# -- installing them -------------------------------------------------------------------------------


def _gather_before_head(module: torch.nn.Module, args: tuple) -> tuple | None:
    sp = active()
    if sp is None:
        return None
    return (gather(args[0], 1, sp), *args[1:])


def _split_after_embedding(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    sp = active()
    if sp is None:
        return None
    return take(output, 1, sp.index, sp.size)


def install(transformer: torch.nn.Module) -> bool:
    """Make `transformer` able to run sequence-parallel calls; False for a network this module
    does not know (its requests are then split by rows only)."""
    kind = type(transformer).__name__
    if kind not in ("SD3Transformer2DModel", "FluxTransformer2DModel"):
        return False
    wrapper = JointAttnSeqParallel if kind == "SD3Transformer2DModel" else FluxAttnSeqParallel
    known = "JointAttnProcessor2_0" if kind == "SD3Transformer2DModel" else "FluxAttnProcessor"
    attentions = [m for m in transformer.modules() if hasattr(m, "processor") and hasattr(m, "set_processor")]
    if not attentions or any(type(m.processor).__name__ not in (known, wrapper.__name__) for m in attentions):
        return False  # dual attention (SD3.5 Medium), IP-adapters...: not split by tokens
    for m in attentions:
        if not isinstance(m.processor, wrapper):
            m.processor = wrapper(m.processor)
    transformer.norm_out.register_forward_pre_hook(_gather_before_head)
    if kind == "SD3Transformer2DModel":
        transformer.pos_embed.register_forward_hook(_split_after_embedding)
    return True
