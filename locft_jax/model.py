"""The decoder forward pass for every supported family, as pure functions over a params pytree.

Params keep Hugging Face names and layouts (``Linear`` weights are ``[out, in]``, RoPE in the
half-split ``rotate_half`` layout), so conversion is a table and export is exact. Numerics follow
transformers: RMSNorm in float32, cast back, *then* scale; RoPE angles in float32; softmax in
float32; logits in float32.

The pass is split into the pieces the editing engine needs to run only part of the model:
``embed`` → ``decoder_layer`` × L (itself ``attention_block`` + ``mlp_block``) → ``final_norm``
→ ``lm_head``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from locft_jax.config import ConfigError, ModelConfig

Params = dict[str, Any]


class Context(NamedTuple):
    """Per-batch tensors shared by every layer: RoPE tables and the attention mask."""

    cos: jax.Array  # [B, T, head_dim], float32
    sin: jax.Array  # [B, T, head_dim], float32
    mask: jax.Array  # [B, 1, 1, T, T] bool: query t may attend key s


def linear(x: jax.Array, p: Params) -> jax.Array:
    """``x @ W.T (+ b)`` with HF's ``[out, in]`` weight layout."""
    y = jnp.einsum("...i,oi->...o", x, p["weight"])
    if "bias" in p:
        y = y + p["bias"]
    return y


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF order: normalise in float32, cast to the input dtype, then multiply by the weight."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    return weight * normed


def inv_frequencies(config: ModelConfig) -> jax.Array:
    """RoPE inverse frequencies in float32, with the configured scaling (llama3, linear, yarn)."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    scaling = config.rope_scaling_dict
    if scaling is None:
        return inv
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv / factor
    if scaling["rope_type"] == "yarn":
        return _yarn_frequencies(inv, scaling, config.rope_theta)
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * jnp.pi / inv
    low_wavelen, high_wavelen = old_len / low, old_len / high
    scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def _yarn_frequencies(inv: jax.Array, scaling: dict[str, Any], theta: float) -> jax.Array:
    """YaRN: interpolated (``inv / factor``) below the correction range, the original above it,
    a linear ramp between (transformers' ``_compute_yarn_parameters``)."""
    dim = 2 * inv.shape[0]
    old_len = scaling["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.get("beta_fast", 32)), correction_dim(scaling.get("beta_slow", 1))
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    return inv / scaling["factor"] * ramp + inv * (1 - ramp)


def rope_attention_factor(config: ModelConfig) -> float:
    """The factor YaRN scales cos and sin by (1 for every other RoPE)."""
    scaling = config.rope_scaling_dict
    if scaling is None or scaling["rope_type"] != "yarn":
        return 1.0
    if "attention_factor" in scaling:
        return float(scaling["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = scaling["factor"]
    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])
    return mscale(factor)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids for left-padded rows: 0 at the first real token (as ``generate`` does)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def make_context(
    config: ModelConfig,
    attention_mask: jax.Array,
    positions: jax.Array | None = None,
    segments: jax.Array | None = None,
) -> Context:
    """RoPE tables and the causal+padding mask for a ``[B, T]`` batch (1 = real token).

    ``segments`` (``[B, T]`` ints): for packed rows, a token attends only within its own segment.
    Unpacked rows are checked against the model's sliding window (``check_attention_span``).
    """
    if segments is None:
        check_attention_span(config, attention_mask.shape[-1], "a batch")
    attention_mask = attention_mask.astype(bool)
    if positions is None:
        positions = positions_from_mask(attention_mask)
    angles = positions.astype(jnp.float32)[..., None] * inv_frequencies(config)
    angles = jnp.concatenate([angles, angles], axis=-1)
    scale = rope_attention_factor(config)
    t = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    mask = causal[None] & attention_mask[:, None, :]
    if segments is not None:
        mask = mask & (segments[:, :, None] == segments[:, None, :])
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return Context(cos, sin, mask[:, None, None])


def check_attention_span(config: ModelConfig, tokens: int, what: str) -> None:
    """Refuse ``tokens`` positions of attention past the model's sliding window: the decoder runs
    full attention, which equals sliding-window attention only while every span fits the window."""
    if config.sliding_window is not None and tokens > config.sliding_window:
        raise ConfigError(
            f"{what} spans {tokens} tokens, more than this model's sliding attention window "
            f"({config.sliding_window}); locft-jax attends to every position, which matches the model "
            f"only up to {config.sliding_window} tokens: use shorter texts"
        )


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Half-split rotation on ``x: [B, T, heads, head_dim]`` (HF's ``rotate_half``)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def attention_scores_to_output(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention. q: [B,T,H,D]; k, v: [B,S,K,D]; mask: [B,1,1,T,S] → [B,T,H,D]."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * (d**-0.5)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def project_qkv(p: Params, x: jax.Array, ctx: Context, config: ModelConfig) -> tuple[jax.Array, ...]:
    """q, k, v for normed input ``x``, with q/k norm (qwen3) and RoPE applied to q and k."""
    b, t, _ = x.shape
    hd = config.head_dim
    q = linear(x, p["q_proj"]).reshape(b, t, config.num_attention_heads, hd)
    k = linear(x, p["k_proj"]).reshape(b, t, config.num_key_value_heads, hd)
    v = linear(x, p["v_proj"]).reshape(b, t, config.num_key_value_heads, hd)
    if config.qk_norm:
        q = rms_norm(q, p["q_norm"]["weight"], config.rms_norm_eps)
        k = rms_norm(k, p["k_norm"]["weight"], config.rms_norm_eps)
    return apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin), v


def attention(p: Params, x: jax.Array, ctx: Context, config: ModelConfig) -> jax.Array:
    """Self-attention on normed input ``x: [B, T, D]`` (no residual)."""
    q, k, v = project_qkv(p, x, ctx, config)
    out = attention_scores_to_output(q, k, v, ctx.mask)
    return linear(out.reshape(*x.shape[:2], -1), p["o_proj"])


def mlp_activation(p: Params, x: jax.Array) -> jax.Array:
    """SwiGLU's hidden activation ``silu(gate(x)) * up(x)``, the input of ``down_proj``."""
    return jax.nn.silu(linear(x, p["gate_proj"])) * linear(x, p["up_proj"])


def mlp(p: Params, x: jax.Array) -> jax.Array:
    return linear(mlp_activation(p, x), p["down_proj"])


def attention_block(p: Params, h: jax.Array, ctx: Context, config: ModelConfig) -> jax.Array:
    """``h + attn(norm(h))``."""
    return h + attention(p["self_attn"], rms_norm(h, p["input_layernorm"]["weight"], config.rms_norm_eps), ctx, config)


def mlp_block(p: Params, h: jax.Array, config: ModelConfig) -> jax.Array:
    """``h + mlp(norm(h))``."""
    return h + mlp(p["mlp"], rms_norm(h, p["post_attention_layernorm"]["weight"], config.rms_norm_eps))


def decoder_layer(p: Params, h: jax.Array, ctx: Context, config: ModelConfig) -> jax.Array:
    return mlp_block(p, attention_block(p, h, ctx, config), config)


def embed(params: Params, input_ids: jax.Array) -> jax.Array:
    return jnp.take(params["model"]["embed_tokens"]["weight"], input_ids, axis=0)


def run_layers(
    params: Params, h: jax.Array, ctx: Context, config: ModelConfig, start: int = 0, stop: int | None = None
) -> jax.Array:
    """Decoder layers ``start .. stop-1`` (default: to the top) on hidden states ``h``."""
    for layer in params["model"]["layers"][start:stop]:
        h = decoder_layer(layer, h, ctx, config)
    return h


def pick_positions(h: jax.Array, at: jax.Array) -> jax.Array:
    """Hidden states ``h`` [B, T, D] at ``at``.

    ``at``: flat indices into B × T ([P] → [P, D]) or positions within each row ([B, U] → [B, U, D]).
    """
    if at.ndim == 1:
        return jnp.take(h.reshape(-1, h.shape[-1]), at, axis=0)
    return jnp.take_along_axis(h, at[..., None], axis=1)


def run_layers_at(
    params: Params, h: jax.Array, ctx: Context, config: ModelConfig, at: jax.Array, start: int = 0
) -> jax.Array:
    """``pick_positions(run_layers(params, h, ctx, config, start), at)``, doing less work.

    The top layer's MLP is a per-token function, so it runs only at ``at``; its attention still
    reads every token.
    """
    layers = params["model"]["layers"]
    top = len(layers) - 1
    if start > top:
        return pick_positions(h, at)
    h = attention_block(layers[top], run_layers(params, h, ctx, config, start, top), ctx, config)
    return mlp_block(layers[top], pick_positions(h, at), config)


def final_norm(params: Params, h: jax.Array, config: ModelConfig) -> jax.Array:
    return rms_norm(h, params["model"]["norm"]["weight"], config.rms_norm_eps)


def lm_head_weight(params: Params, config: ModelConfig) -> jax.Array:
    """The ``[vocab, hidden]`` output projection (the token embeddings when tied)."""
    return params["model"]["embed_tokens"]["weight"] if config.tie_word_embeddings else params["lm_head"]["weight"]


def lm_head(params: Params, h_normed: jax.Array, config: ModelConfig) -> jax.Array:
    """Float32 logits from final-normed hidden states (tied embeddings when configured)."""
    return jnp.einsum("...i,vi->...v", h_normed, lm_head_weight(params, config), preferred_element_type=jnp.float32)


def hidden_states(
    params: Params,
    config: ModelConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
) -> jax.Array:
    """Final-normed hidden states ``[B, T, D]`` for ``input_ids: [B, T]`` (left padding allowed)."""
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, dtype=bool)
    ctx = make_context(config, attention_mask, positions)
    return final_norm(params, run_layers(params, embed(params, input_ids), ctx, config), config)


def logits(
    params: Params,
    config: ModelConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
) -> jax.Array:
    """Float32 logits ``[B, T, V]``."""
    return lm_head(params, hidden_states(params, config, input_ids, attention_mask, positions), config)
