"""Tokenizers for the tiny models, built offline from a small built-in text.

Why: no tokenizer files can be downloaded here, yet the encoders must go through the
real `CLIPTokenizer` / `T5Tokenizer` code paths (padding, truncation, special tokens)
that `StableDiffusion3Pipeline` uses. So we build real tokenizer objects from an
in-memory vocabulary:

* CLIP: byte-level BPE whose base alphabet covers all 256 bytes (with and without the
  `</w>` end-of-word suffix), so every input, emoji included, maps to known tokens;
  merges are learned from `CORPUS` (ties broken by the pair, not by hash order) so common
  words are a few tokens, not one per letter.
* T5: a Unigram (sentencepiece-style) vocabulary with `<pad>`=0, `</s>`=1, `<unk>`=2,
  whole words from `CORPUS` plus single characters; anything else becomes `<unk>`.

Both are deterministic: the same code builds the same vocabulary in every process.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from itertools import pairwise

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import CLIPTokenizer, T5TokenizerFast

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512

# A small English text covering the vocabulary of typical image prompts.
CORPUS = """
a photo of a cat sitting on a chair in the sun, highly detailed, 4k, digital art
a painting of a dog running through a field of flowers at sunset, oil on canvas
an astronaut riding a horse on the moon, cinematic lighting, dramatic sky
a red car parked in front of an old house with a blue door and white windows
portrait of a woman with long hair, studio light, sharp focus, trending on artstation
a city street at night with neon signs and rain, reflections, cyberpunk style
a bowl of fruit on a wooden table, still life, soft shadows, realistic
mountains covered in snow under a clear sky, landscape photography, wide angle
a small boat on a calm lake surrounded by green trees in the morning fog
a castle on a hill, fantasy, magic, epic, matte painting, concept art
a cute robot holding a sign that says hello world, cartoon, illustration
blurry, low quality, bad anatomy, ugly, deformed, watermark, text, jpeg artifacts
the quick brown fox jumps over the lazy dog near the river bank
a bird flying over the ocean with waves and clouds, beautiful, colorful, vibrant
close up of a face, black and white, film grain, vintage, 35mm, bokeh
"""

_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_CLIP_MERGES = 400


def _clip_pre_tokenizer() -> Tokenizer:
    """CLIPTokenizer's normalisation and pre-tokenization, as a `tokenizers` pipeline."""
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return tok


def _learn_merges(words: Counter[tuple[str, ...]], vocab: set[str], vocab_size: int) -> list[tuple[str, str]]:
    """Byte-pair merges, most frequent pair first, ties broken by the pair itself.

    Why not `tokenizers.trainers.BpeTrainer`: it breaks frequency ties by hash order, so two
    processes learned different vocabularies from the same text (a cache built on another
    host would tokenize the same prompt differently). Same algorithm, same stopping rule
    (the vocabulary reaches `vocab_size`, or no pair occurs twice), but deterministic.
    """
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < 2:  # min_frequency
            break
        merges.append(best)
        vocab.add(best[0] + best[1])
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn byte-level BPE merges on CORPUS with the same pre-tokenization as CLIPTokenizer."""
    tok = _clip_pre_tokenizer()
    words: Counter[tuple[str, ...]] = Counter()
    for line in CORPUS.strip().splitlines() * 3:  # x3, as the vocabulary was first trained
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(line)):
            words[(*word[:-1], word[-1] + "</w>")] += 1
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    symbols = set(alphabet) | {symbol for word in words for symbol in word}
    merges = _learn_merges(words, symbols, vocab_size=2 * len(alphabet) + _CLIP_MERGES)
    # Base tokens first (every byte, bare and word-final), like CLIP's real vocab, then merges.
    base = sorted(alphabet)
    ordered = base + [b + "</w>" for b in base]
    for merge in merges:
        ordered.append(merge[0] + merge[1])
    vocab: dict[str, int] = {}
    for token in ordered:
        vocab.setdefault(token, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab, merges


def build_clip_tokenizer() -> CLIPTokenizer:
    """A real CLIPTokenizer (77 tokens, BOS/EOS, pad with EOS) over an in-memory BPE vocabulary."""
    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def _t5_vocab() -> list[tuple[str, float]]:
    """Unigram pieces: specials, whole words with log-frequency scores, then single characters."""
    words = Counter(re.findall(r"[a-z]+|\d|[^\sa-z\d]", CORPUS.lower()))
    total = sum(words.values())
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {p for p, _ in pieces}
    for word, count in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        piece = "\u2581" + word
        if piece not in seen:
            pieces.append((piece, math.log(count / total)))
            seen.add(piece)
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-_()[]{}/\\&%$#@*+=<>|~`^"
    for ch in chars:
        for piece in (ch, "\u2581" + ch):
            if piece not in seen:
                pieces.append((piece, -20.0))
                seen.add(piece)
    return pieces


def build_t5_tokenizer() -> T5TokenizerFast:
    """A real T5 tokenizer (appends `</s>`, pads with `<pad>`=0) over an in-memory Unigram vocabulary."""
    return T5TokenizerFast(vocab=_t5_vocab(), extra_ids=0, model_max_length=T5_MAX_LENGTH)
