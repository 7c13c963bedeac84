"""Teacher-forced scoring of target tokens: argmax and log-probability at each target position.

EasyEdit's token accuracy feeds ``prompt + " " + target`` and counts the target tokens whose argmax
prediction (from the position before) equals the token. Logits are computed only at target
positions: the hidden states are gathered there, then ``final_norm`` and ``lm_head`` run on
``[B, U]`` rows instead of ``[B, T]`` — exact, because both act on each position alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from locft_jax import model as model_lib
from locft_jax.config import ModelConfig
from locft_jax.model import Params
from locft_jax.sharding import host_array, rows_over_data
from locft_jax.tokens import DEFAULT_BUCKETS, PromptTarget, bucket, encode_pairs, pad_target_batch

DEFAULT_BATCH_SIZE = 16
# Target lengths are bucketed too (short answers dominate; perplexity windows use the long ones).
TARGET_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class TargetScore(NamedTuple):
    """One sequence's target tokens, the model's argmax at each, and their log-probabilities."""

    target: np.ndarray  # [U] int
    predicted: np.ndarray  # [U] int: argmax of the logits at the position before each target token
    logprob: np.ndarray  # [U] float32: log p(target token)

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.predicted == self.target))


@jax.jit(static_argnames=("config",))
def _score_batch(
    params: Params,
    config: ModelConfig,
    ids: jax.Array,
    mask: jax.Array,
    target_pos: jax.Array,
    target_ids: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    ctx = model_lib.make_context(config, mask)
    h = model_lib.run_layers(params, model_lib.embed(params, ids), ctx, config)
    h = jnp.take_along_axis(h, target_pos[..., None], axis=1)
    logits = model_lib.lm_head(params, model_lib.final_norm(params, h, config), config)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), target_ids[..., None], axis=-1)[..., 0]
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), logprob


def compile_count() -> int:
    """How many shapes the scoring function has compiled for."""
    return _score_batch._cache_size()


def score_pairs(
    params: Params,
    config: ModelConfig,
    pairs: Sequence[PromptTarget],
    batch_size: int = DEFAULT_BATCH_SIZE,
    pad_id: int = 0,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
) -> list[TargetScore]:
    """Score every pair's target tokens (``target_ids`` as given: add EOS or not before calling).

    Batches are split over the data axis of the params' mesh (``batch_size`` rounded up to it).
    """
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].prompt_ids) + len(pairs[i].target_ids))
    batch_size, sharding, _ = rows_over_data(params, batch_size)
    out: list[TargetScore] = [None] * len(pairs)  # type: ignore[list-item]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        chunk = [pairs[i] for i in rows]
        # Pad the batch with copies of its first pair: fixed batch shape, results thrown away.
        chunk += [chunk[0]] * (batch_size - len(chunk))
        seq_len = bucket(max(len(p.prompt_ids) + len(p.target_ids) for p in chunk), buckets)
        target_len = bucket(max(len(p.target_ids) for p in chunk), TARGET_BUCKETS)
        batch = pad_target_batch(chunk, seq_len, target_len, pad_id)
        arrays = jax.device_put((*batch[:3], batch.target_ids), sharding)  # each device its own rows
        pred, logprob = (host_array(x) for x in _score_batch(params, config, *arrays))
        for r, i in enumerate(rows):
            n = len(pairs[i].target_ids)
            out[i] = TargetScore(np.asarray(pairs[i].target_ids), pred[r, :n], logprob[r, :n])
    return out


def score_targets(
    params: Params,
    config: ModelConfig,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[TargetScore]:
    """Score ``" " + target`` after each prompt, without EOS (EasyEdit scores the target only)."""
    pairs = encode_pairs(tokenizer, prompts, targets, add_eos=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return score_pairs(params, config, pairs, batch_size, pad_id)


def token_accuracy(
    params: Params,
    config: ModelConfig,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[float]:
    """EasyEdit's teacher-forced token accuracy of each (prompt, target)."""
    return [s.accuracy for s in score_targets(params, config, tokenizer, prompts, targets, batch_size)]
