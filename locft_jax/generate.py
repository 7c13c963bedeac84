"""Greedy generation with a KV cache and continuous batching, in fixed shapes.

A fixed number of *slots* (``batch_size``; fewer for a short list) decode one token each per step. When a row stops, its
slot is refilled with the next prompt, so a batch does not wait for its longest continuation:
answers of 2–30 tokens cost about their own length, not the batch's longest. Slots hold prompts
left-padded to ``P`` (the bucket of the call's longest prompt) plus ``max_new_tokens`` cache slots;
new prompts are prefilled ``batch_size // 4`` at a time, each group padded to its own length
bucket, so a call compiles the decode loop once and the prefill once per prompt bucket met.

Numerics follow ``transformers`` ``generate(do_sample=False)``: positions start at 0 at each row's
first real token (``model.positions_from_mask``) and grow by one per generated token; a row's
result does not depend on which other rows share its steps.

Stopping: a row stops at EOS, or at a token whose text contains a one-character stop string
(``"."``, ``"\\n"``); the decoded text is then cut before the first stop string. Stopping on the
token is exact: the text before the first stop string is fixed once the token holding it exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from locft_jax import model as model_lib
from locft_jax.config import ModelConfig
from locft_jax.model import Context, Params
from locft_jax.sharding import host_array, rows_over_data
from locft_jax.tokens import DEFAULT_BUCKETS, bucket, encode_prompt

DEFAULT_STOP_AT = (".", "\n")
DEFAULT_BATCH_SIZE = 64
MIN_SLOTS = 8


class KVCache(NamedTuple):
    """One layer's keys and values, ``[B, S, kv_heads, head_dim]``."""

    k: jax.Array
    v: jax.Array


def cached_decoder_layer(
    p: Params, h: jax.Array, ctx: Context, config: ModelConfig, cache: KVCache, write_at: jax.Array
) -> tuple[jax.Array, KVCache]:
    """A decoder layer for ``h: [B, T, D]`` that stores row b's k, v at cache slots ``write_at[b] + t``.

    Queries attend over the whole cache through ``ctx.mask: [B, 1, 1, T, S]``; the layer math is
    ``model``'s (``project_qkv``, ``attention_scores_to_output``, ``mlp_block``).
    """
    x = model_lib.rms_norm(h, p["input_layernorm"]["weight"], config.rms_norm_eps)
    q, k, v = model_lib.project_qkv(p["self_attn"], x, ctx, config)
    rows = jnp.arange(h.shape[0])[:, None]
    cols = write_at[:, None] + jnp.arange(h.shape[1])
    cache = KVCache(
        cache.k.at[rows, cols].set(k.astype(cache.k.dtype)), cache.v.at[rows, cols].set(v.astype(cache.v.dtype))
    )
    out = model_lib.attention_scores_to_output(q, cache.k, cache.v, ctx.mask)
    h = h + model_lib.linear(out.reshape(*h.shape[:2], -1), p["self_attn"]["o_proj"])
    return model_lib.mlp_block(p, h, config), cache


def _forward_cached(
    params: Params,
    config: ModelConfig,
    ids: jax.Array,
    ctx: Context,
    caches: tuple[KVCache, ...],
    write_at: jax.Array,
) -> tuple[jax.Array, tuple[KVCache, ...]]:
    """Greedy next token after the last position of ``ids: [B, T]``, updating every layer's cache."""
    h = model_lib.embed(params, ids)
    new_caches = []
    for layer, cache in zip(params["model"]["layers"], caches, strict=True):
        h, cache = cached_decoder_layer(layer, h, ctx, config, cache, write_at)
        new_caches.append(cache)
    last = model_lib.final_norm(params, h[:, -1], config)
    next_token = jnp.argmax(model_lib.lm_head(params, last, config), axis=-1).astype(jnp.int32)
    return next_token, tuple(new_caches)


class Slots(NamedTuple):
    """The decoder's device state: ``B`` slots, each one prompt's cache and its answer so far."""

    caches: tuple[KVCache, ...]  # per layer [B, S, kv_heads, head_dim], S = P + max_new_tokens
    prompt_keys: jax.Array  # [B, P] bool: the slot's prompt tokens, left-padded to P
    prompt_len: jax.Array  # [B] int32
    count: jax.Array  # [B] int32: tokens generated so far
    done: jax.Array  # [B] bool: stopped (or never filled)
    out: jax.Array  # [B, max_new_tokens] int32: the tokens generated, up to the stop token


def empty_slots(
    params: Params, config: ModelConfig, batch_size: int, prompt_len: int, max_new_tokens: int, sharding: Any
) -> Slots:
    """``batch_size`` stopped slots for prompts of up to ``prompt_len`` tokens, placed by ``sharding``."""
    model_lib.check_attention_span(config, prompt_len + max_new_tokens, "a prompt with its generated tokens")
    dtype = params["model"]["embed_tokens"]["weight"].dtype
    shape = (batch_size, prompt_len + max_new_tokens, config.num_key_value_heads, config.head_dim)
    layers = params["model"]["layers"]
    slots = Slots(
        caches=tuple(KVCache(np.zeros(shape, dtype), np.zeros(shape, dtype)) for _ in layers),
        prompt_keys=np.zeros((batch_size, prompt_len), bool),
        prompt_len=np.zeros(batch_size, np.int32),
        count=np.zeros(batch_size, np.int32),
        done=np.ones(batch_size, bool),
        out=np.zeros((batch_size, max_new_tokens), np.int32),
    )
    return jax.device_put(slots, sharding)


@jax.jit(static_argnames=("config",))
def _prefill(
    params: Params, config: ModelConfig, ids: jax.Array, mask: jax.Array
) -> tuple[jax.Array, tuple[KVCache, ...]]:
    """First greedy token ``[R]`` and the caches ``[R, Q, ...]`` of left-padded prompts ``ids``/``mask: [R, Q]``."""
    r, q = ids.shape
    dtype = params["model"]["embed_tokens"]["weight"].dtype
    shape = (r, q, config.num_key_value_heads, config.head_dim)
    fresh = tuple(KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in params["model"]["layers"])
    ctx = model_lib.make_context(config, mask)
    return _forward_cached(params, config, ids, ctx, fresh, jnp.zeros(r, jnp.int32))


def _start(
    slots: Slots, rows: jax.Array, mask: jax.Array, first: jax.Array, caches: tuple[KVCache, ...], stop_mask: jax.Array
) -> Slots:
    """Put prefilled prompts (``mask: [R, Q]``, Q ≤ P) into slots ``rows: [R]``; row index ``B`` is dropped.

    The prompt's keys land at cache slots ``P - Q .. P - 1``, so every prompt ends at slot ``P - 1``.
    """
    r, q = mask.shape
    p = slots.prompt_keys.shape[1]
    max_new = slots.out.shape[1]

    def place(buf: jax.Array, new: jax.Array) -> jax.Array:
        return buf.at[rows, p - q : p].set(new, mode="drop")

    keys = jnp.zeros((r, p), bool).at[:, p - q :].set(mask)
    return Slots(
        caches=tuple(KVCache(place(c.k, n.k), place(c.v, n.v)) for c, n in zip(slots.caches, caches, strict=True)),
        prompt_keys=slots.prompt_keys.at[rows].set(keys, mode="drop"),
        prompt_len=slots.prompt_len.at[rows].set(jnp.sum(mask, axis=-1, dtype=jnp.int32), mode="drop"),
        count=slots.count.at[rows].set(1, mode="drop"),
        done=slots.done.at[rows].set(stop_mask[first] | (max_new == 1), mode="drop"),
        out=slots.out.at[rows].set(jnp.zeros((r, max_new), jnp.int32).at[:, 0].set(first), mode="drop"),
    )


def _decode(params: Params, config: ModelConfig, slots: Slots, stop_mask: jax.Array, until_done: jax.Array) -> Slots:
    """Decode one token per live slot per step until ``until_done`` slots have stopped (or all have).

    The token generated last in slot b (its ``count - 1``-th) is fed at position
    ``prompt_len + count - 1`` and cached at slot ``P + count - 1``.
    """
    b, p = slots.prompt_keys.shape
    max_new = slots.out.shape[1]
    rows = jnp.arange(b)
    generated = jnp.arange(max_new)

    def cond(state: tuple[Slots, jax.Array]) -> jax.Array:
        s, steps = state
        return (steps < max_new) & (jnp.sum(s.done) < until_done)

    def body(state: tuple[Slots, jax.Array]) -> tuple[Slots, jax.Array]:
        s, steps = state
        live = ~s.done
        token = s.out[rows, jnp.maximum(s.count - 1, 0)]
        keys = jnp.concatenate([s.prompt_keys, generated[None, :] < s.count[:, None]], axis=-1)
        ctx = model_lib.make_context(config, jnp.ones((b, 1), bool), (s.prompt_len + s.count - 1)[:, None])
        ctx = ctx._replace(mask=keys[:, None, None, None, :])
        nxt, caches = _forward_cached(params, config, token[:, None], ctx, s.caches, p + s.count - 1)
        out = s.out.at[rows, jnp.where(live, s.count, max_new)].set(nxt, mode="drop")
        count = s.count + live
        done = s.done | stop_mask[nxt] | (count >= max_new)
        return Slots(caches, s.prompt_keys, s.prompt_len, count, done, out), steps + 1

    return jax.lax.while_loop(cond, body, (slots, jnp.int32(0)))[0]


_SLOT_STEPS: dict[Any, tuple[Any, Any]] = {}


def _slot_steps(sharding: Any) -> tuple[Any, Any]:
    """``_start`` and ``_decode`` jitted with their slots placed by ``sharding`` (so each compiles
    once per shape, whichever of them produced the slots it is given)."""
    if sharding not in _SLOT_STEPS:
        _SLOT_STEPS[sharding] = (
            jax.jit(_start, donate_argnames=("slots",), out_shardings=sharding),
            jax.jit(_decode, static_argnames=("config",), donate_argnames=("slots",), out_shardings=sharding),
        )
    return _SLOT_STEPS[sharding]


def compile_count() -> int:
    """How many shapes the model-running steps (prefill, decode) have compiled for (tests: no
    recompile per batch). ``_start``, a scatter of new rows into the slots, is not counted."""
    return _prefill._cache_size() + sum(decode._cache_size() for _, decode in _SLOT_STEPS.values())


# (id(tokenizer), vocab, eos, chars) -> (tokenizer, mask): decoding a whole vocabulary takes ~1 s.
_STOP_MASKS: dict[tuple, tuple[Any, np.ndarray]] = {}


def stop_token_mask(
    vocab_size: int, eos_ids: Sequence[int], tokenizer: Any = None, stop_at: Sequence[str] = ()
) -> np.ndarray:
    """``[V]`` bool: EOS ids, plus tokens whose text holds a one-character stop string.

    Longer stop strings can span tokens, so they only truncate the text afterwards.
    """
    chars = tuple(sorted({s for s in stop_at if len(s) == 1})) if tokenizer is not None else ()
    key = (id(tokenizer), vocab_size, tuple(eos_ids), chars)
    if key in _STOP_MASKS and _STOP_MASKS[key][0] is tokenizer:
        return _STOP_MASKS[key][1]
    mask = np.zeros(vocab_size, dtype=bool)
    mask[[i for i in eos_ids if i is not None and 0 <= i < vocab_size]] = True
    if chars:
        n = min(vocab_size, len(tokenizer))
        texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=True)
        mask[:n] |= np.array([any(c in t for c in chars) for t in texts])
    _STOP_MASKS[key] = (tokenizer, mask)
    return mask


def cut_at_stop(tokens: np.ndarray, stop_mask: np.ndarray) -> list[int]:
    """``tokens`` up to and including the first stop token (``stop_mask: [V]``), as ``generate_ids`` returns them."""
    hits = np.flatnonzero(stop_mask[tokens])
    return tokens[: hits[0] + 1 if hits.size else len(tokens)].tolist()


def generate_ids(
    params: Params,
    config: ModelConfig,
    prompt_ids: Sequence[Sequence[int]],
    stop_mask: np.ndarray,
    max_new_tokens: int = 32,
    batch_size: int = DEFAULT_BATCH_SIZE,
    pad_id: int = 0,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
) -> list[list[int]]:
    """Greedy continuations (token ids, up to and including the first stop token) per prompt.

    ``batch_size`` slots decode together (fewer for fewer prompts: the power of two that holds them,
    at least ``MIN_SLOTS``; both rounded up to a multiple of the params' mesh data axis); a slot whose
    row stopped takes the next prompt (shortest first, so each prefill group of ``batch_size // 4`` is
    tightly padded). Results keep input order. ``batch_size`` < 1 is a ``ValueError``.
    """
    if max_new_tokens < 1 or not prompt_ids:
        return [[] for _ in prompt_ids]
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError(f"empty prompt at index {next(i for i, p in enumerate(prompt_ids) if not p)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pending = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    batch_size = min(batch_size, max(MIN_SLOTS, 1 << (len(prompt_ids) - 1).bit_length()))
    batch_size, sharding, data = rows_over_data(params, batch_size)  # each device decodes its own slots
    group = min(batch_size, -(-max(1, batch_size // 4) // data) * data)  # a multiple of the data axis
    start, decode = _slot_steps(sharding)
    p = bucket(len(prompt_ids[pending[-1]]), buckets)
    slots = empty_slots(params, config, batch_size, p, max_new_tokens, sharding)
    stop = jnp.asarray(stop_mask)
    held = np.full(batch_size, -1)  # the prompt index each slot holds, -1 when free
    results: list[list[int]] = [[] for _ in prompt_ids]
    while True:
        free = np.flatnonzero(held < 0)
        while pending and len(free) >= min(group, len(pending)):
            take, pending = pending[:group], pending[group:]
            rows, ids, mask = _prefill_rows(prompt_ids, take, free, group, batch_size, pad_id, buckets)
            ids, mask = jax.device_put((ids, mask), sharding)  # each device prefills its share
            slots = start(slots, rows, mask, *_prefill(params, config, ids, mask), stop)
            held[free[: len(take)]] = take
            free = free[len(take) :]
        if not pending and (held < 0).all():
            return results
        until = min(group, len(pending)) if pending else batch_size
        slots = decode(params, config, slots, stop, jnp.int32(until))
        done, count, out = (host_array(x) for x in (slots.done, slots.count, slots.out))
        for slot in np.flatnonzero(done & (held >= 0)):
            results[held[slot]] = out[slot, : count[slot]].tolist()
            held[slot] = -1


def _prefill_rows(
    prompt_ids: Sequence[Sequence[int]],
    take: list[int],
    free: np.ndarray,
    group: int,
    batch_size: int,
    pad_id: int,
    buckets: Sequence[int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slot indices ``[group]`` and left-padded ``ids``/``mask`` for the prompts ``take``.

    Missing rows go to slot ``batch_size`` (dropped) with one visible token, so no attention row is empty.
    """
    q = bucket(max(len(prompt_ids[i]) for i in take), buckets)
    rows = np.full(group, batch_size, dtype=np.int32)
    rows[: len(take)] = free[: len(take)]
    ids = np.full((group, q), pad_id, dtype=np.int32)
    mask = np.zeros((group, q), dtype=bool)
    mask[:, -1] = True
    for r, i in enumerate(take):
        seq = prompt_ids[i]
        ids[r, q - len(seq) :] = seq
        mask[r, q - len(seq) :] = True
    return rows, ids, mask


def truncate_at_stops(text: str, stop_at: Sequence[str]) -> str:
    """``text`` before the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop_at if s) if i >= 0), default=len(text))
    return text[:cut]


def eos_ids(config: ModelConfig, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS and the checkpoint's (``ModelConfig.eos_token_ids``, else ``eos_token_id``)."""
    ids = [getattr(tokenizer, "eos_token_id", None), *(config.eos_token_ids or [config.eos_token_id])]
    return sorted({i for i in ids if i is not None})


def generate_greedy(
    params: Params,
    config: ModelConfig,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = DEFAULT_BATCH_SIZE,
    stop_at: Sequence[str] = DEFAULT_STOP_AT,
) -> list[str]:
    """Greedy continuation text per prompt (no chat template), cut at EOS and the stop strings."""
    stop_mask = stop_token_mask(config.vocab_size, eos_ids(config, tokenizer), tokenizer, stop_at)
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = generate_ids(params, config, ids, stop_mask, max_new_tokens, batch_size, pad_id)
    return [truncate_at_stops(tokenizer.decode(t, skip_special_tokens=True), stop_at) for t in out]
