"""Tokenizing prompt/target pairs with explicit lengths, and padding into fixed shape buckets.

A training (or teacher-forced) sequence is ``tok(prompt + " " + target) + [eos]``, as the reference
code builds it; the target's span starts after ``tok(prompt)``'s tokens, known exactly (never found by
matching a pad id, which may equal EOS). Byte-level BPE (Llama 3, Qwen, SmolLM2) splits at the space,
so this equals ``tok(prompt) + tok(" " + target)``; SentencePiece tokenizers (Llama 2, Mistral) give a
lone ``" " + target`` an extra "▁" token that the joint text does not have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from locft_jax.requests import RequestError

# Padded lengths: a jitted function compiles once per bucket it meets, not once per length.
# Steps of 8 at the short end, where edit prompts live (padding is wasted FLOPs), then ×1.5.
DEFAULT_BUCKETS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


class PromptTarget(NamedTuple):
    prompt_ids: list[int]
    target_ids: list[int]


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's ids, with whatever special tokens (BOS) the tokenizer adds."""
    return list(tokenizer(prompt)["input_ids"])


def encode_target(tokenizer: Any, target: str, add_eos: bool = True) -> list[int]:
    """``" " + target`` (the space belongs to the target) and EOS, without special tokens."""
    ids = list(tokenizer(" " + target.lstrip(), add_special_tokens=False)["input_ids"])
    if add_eos:
        ids.append(tokenizer.eos_token_id)
    return ids


def encode_pair(tokenizer: Any, prompt: str, target: str, add_eos: bool = True) -> PromptTarget:
    """``prompt`` and ``target`` tokenized together (``prompt + " " + target``), split after the prompt's
    own tokens; if the joint tokens do not start with those (the two merge at the boundary), the
    target is tokenized alone (``encode_target``)."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    joint = encode_prompt(tokenizer, f"{prompt} {target.lstrip()}")
    if joint[: len(prompt_ids)] != prompt_ids or len(joint) == len(prompt_ids):
        return PromptTarget(prompt_ids, encode_target(tokenizer, target, add_eos))
    return PromptTarget(prompt_ids, joint[len(prompt_ids) :] + ([tokenizer.eos_token_id] if add_eos else []))


def encode_pairs(
    tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], add_eos: bool = True
) -> list[PromptTarget]:
    """Tokenize each (prompt, target); an empty prompt or target is an error naming the record."""
    out = []
    for i, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        p, t = encode_pair(tokenizer, prompt, target, add_eos)
        if not p:
            raise RequestError(f"record {i}: prompt {prompt!r} tokenizes to nothing")
        if len(t) <= int(add_eos):
            raise RequestError(f"record {i}: target {target!r} tokenizes to nothing")
        out.append(PromptTarget(p, t))
    return out


def bucket(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The smallest bucket ≥ ``n`` (a multiple of the largest bucket beyond it)."""
    for b in buckets:
        if n <= b:
            return b
    top = buckets[-1]
    return -(-n // top) * top


class TargetBatch(NamedTuple):
    """Right-padded sequences plus where each target token sits.

    ``ids``/``mask``: [B, T]. ``target_pos``/``target_ids``/``target_mask``: [B, U], where
    position ``target_pos[b, u]`` predicts ``target_ids[b, u]`` (i.e. the token one step later).
    """

    ids: np.ndarray
    mask: np.ndarray
    target_pos: np.ndarray
    target_ids: np.ndarray
    target_mask: np.ndarray


def pad_target_batch(pairs: Sequence[PromptTarget], seq_len: int, target_len: int, pad_id: int = 0) -> TargetBatch:
    """Pack pairs into fixed ``[B, seq_len]`` / ``[B, target_len]`` arrays (rows may be empty padding)."""
    b = len(pairs)
    ids = np.full((b, seq_len), pad_id, dtype=np.int32)
    mask = np.zeros((b, seq_len), dtype=bool)
    tpos = np.zeros((b, target_len), dtype=np.int32)
    tids = np.zeros((b, target_len), dtype=np.int32)
    tmask = np.zeros((b, target_len), dtype=bool)
    for row, (p, t) in enumerate(pairs):
        seq = p + t
        if len(seq) > seq_len or len(t) > target_len:
            raise ValueError(f"row {row}: length {len(seq)}/{len(t)} exceeds bucket {seq_len}/{target_len}")
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = True
        tpos[row, : len(t)] = np.arange(len(p) - 1, len(p) - 1 + len(t))
        tids[row, : len(t)] = t
        tmask[row, : len(t)] = True
    return TargetBatch(ids, mask, tpos, tids, tmask)
