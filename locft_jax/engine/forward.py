"""The edit loss, run from the frozen-prefix cache point (or from the embeddings) upward.

Everything below the lowest edited tensor is frozen, so its output for a request never changes:
``prefix_inputs`` computes it once, ``suffix_hidden`` runs only the edited part and what lies
above it. Running ``suffix_hidden`` from ``point=None`` (the token ids) is the plain path, and
both give the same loss (tested).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from locft_jax import model as M
from locft_jax.config import ModelConfig
from locft_jax.engine.head_loss import chunked_logprobs
from locft_jax.engine.locations import CachePoint, Location
from locft_jax.params import Params, name_path

Inputs = dict[str, jax.Array]  # {"ids"} for the plain path; {"h"} or {"h", "act"} from the cache


def merge(params: Params, trainable: dict[str, jax.Array]) -> Params:
    """``params`` with the tensors named in ``trainable`` replaced (copy-on-write along each path)."""
    out = dict(params)
    for name, value in trainable.items():
        *parents, leaf = name_path(name)
        node: Any = out
        for key in parents:
            child = node[key]
            child = list(child) if isinstance(child, list) else dict(child)
            node[key] = child
            node = child
        node[leaf] = value
    return out


def prefix_inputs(params: Params, config: ModelConfig, location: Location, point: CachePoint, ids, mask) -> Inputs:
    """The frozen part's output at ``point`` for a right-padded batch ``ids``/``mask`` ([B, T])."""
    ctx = M.make_context(config, mask)
    layer = location.lowest
    h = M.run_layers(params, M.embed(params, ids), ctx, config, stop=layer)
    if point is CachePoint.LAYER_INPUT:
        return {"h": h}
    lp = params["model"]["layers"][layer]
    h = M.attention_block(lp, h, ctx, config)
    if point is CachePoint.MLP_INPUT:
        return {"h": h}
    normed = M.rms_norm(h, lp["post_attention_layernorm"]["weight"], config.rms_norm_eps)
    return {"h": h, "act": M.mlp_activation(lp["mlp"], normed)}


def suffix_hidden(
    params: Params,
    config: ModelConfig,
    location: Location,
    point: CachePoint | None,
    inputs: Inputs,
    mask,
    at,
    positions=None,
    segments=None,
) -> jax.Array:
    """Last-layer hidden states (before the final norm) at ``at``, starting from ``point``'s inputs.

    ``at``: the positions the loss reads (``model.pick_positions``: flat [P] or per row [B, U]); the
    top layer's MLP runs only there. ``positions``/``segments``: for packed rows (see ``packing``),
    each token's position in its request and which request it belongs to.
    """
    ctx = M.make_context(config, mask, positions, segments)
    layer = location.lowest
    if point is None:
        return M.run_layers_at(params, M.embed(params, inputs["ids"]), ctx, config, at)
    if point is CachePoint.LAYER_INPUT:
        return M.run_layers_at(params, inputs["h"], ctx, config, at, start=layer)
    lp = params["model"]["layers"][layer]
    if point is CachePoint.MLP_INPUT:
        h = M.mlp_block(lp, inputs["h"], config)
    else:
        h = inputs["h"] + M.linear(inputs["act"], lp["mlp"]["down_proj"])
    return M.run_layers_at(params, h, ctx, config, at, start=layer + 1)


def target_vectors(w: jax.Array, target_ids: jax.Array, soft: jax.Array | None = None) -> jax.Array:
    """Each target's output vector (float32): head row ``w[t]`` for a token id ``t < V``; for
    ``t = V + s``, row ``s`` of ``soft``, a soft target ``Σ_v r_v w_v`` (``retain_kl``)."""
    vocab = w.shape[0]
    hard = jnp.take(w, jnp.minimum(target_ids, vocab - 1), axis=0).astype(jnp.float32)
    if soft is None:
        return hard
    rows = jnp.take(soft, jnp.clip(target_ids - vocab, 0, soft.shape[0] - 1), axis=0).astype(jnp.float32)
    return jnp.where((target_ids >= vocab)[..., None], rows, hard)


def target_logprobs(
    params: Params, config: ModelConfig, picked: jax.Array, target_ids, head_chunk: int = 0, soft=None
) -> jax.Array:
    """log p(target_ids[b, u]) from the hidden states ``picked`` at the predicting positions.

    The final norm and LM head run only there (the head is a large share of a small model's work).
    ``head_chunk > 0``: the head runs over the vocabulary in chunks of that many rows with its
    gradient formed on the way (``head_loss``); 0: plain logits and logsumexp. A soft target
    (``target_vectors``; id ``V + s`` with ``soft`` [S, D]) gives ``Σ_v r_v log p_v`` instead.
    """
    normed = M.final_norm(params, picked, config)
    w = M.lm_head_weight(params, config)
    vectors = target_vectors(w, target_ids, soft)
    if head_chunk:
        dim = normed.shape[-1]
        flat = chunked_logprobs(normed.reshape(-1, dim), w, vectors.reshape(-1, dim), head_chunk)
        return flat.reshape(target_ids.shape)
    logits = M.lm_head(params, normed, config)
    target_logit = jnp.einsum("...d,...d->...", normed, vectors, preferred_element_type=jnp.float32)
    return target_logit - jax.nn.logsumexp(logits, axis=-1)


def per_sample_loss(logp: jax.Array, target_mask: jax.Array) -> jax.Array:
    """Mean negative log-likelihood over each sample's target tokens."""
    tmask = target_mask.astype(jnp.float32)
    return -(logp * tmask).sum(-1) / jnp.maximum(tmask.sum(-1), 1.0)


def per_slot_loss(logp: jax.Array, target_slot: jax.Array, slots: int) -> jax.Array:
    """``per_sample_loss`` for flat target tokens: ``target_slot[p]`` is token p's sample, -1 padding."""
    valid = (target_slot >= 0).astype(jnp.float32)
    slot = jnp.maximum(target_slot, 0)
    total = jax.ops.segment_sum(-logp * valid, slot, num_segments=slots)
    return total / jnp.maximum(jax.ops.segment_sum(valid, slot, num_segments=slots), 1.0)


def batch_mean(per_sample: jax.Array, row_valid: jax.Array) -> jax.Array:
    """Mean over the real rows (padding rows fill the last batch to its fixed size)."""
    valid = row_valid.astype(jnp.float32)
    return (per_sample * valid).sum() / jnp.maximum(valid.sum(), 1.0)
