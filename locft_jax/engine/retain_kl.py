"""KL retain rows: keep the unedited model's whole next-token distribution, not only its argmax.

Cross-entropy towards the model's own greedy answer (``retain_loss="ce"``) is not a keep-as-is
loss: at the unedited weights its gradient is not zero (it sharpens the answer), so it moves the
model even when the edits ask nothing of those prompts. ``retain_loss="kl"`` scores each retain
row's answer positions by ``KL(r ‖ p)``, ``r`` the unedited model's distribution there and ``p``
the edited one's: zero, with a zero gradient, at the unedited weights.

It costs one vector per position. The LM head ``W`` is frozen, so
``Σ_v r_v log p_v = (Σ_v r_v W_v)·h − logsumexp(W h)``: a soft target is ``e = rᵀW``, which the
train step's head (``forward.target_vectors``) takes in place of a token's row ``W_t``. The row's
``loss_offset``, the mean of ``Σ_v r_v log r_v`` over its positions, makes its loss the mean KL
itself (≥ 0, as the loss thresholds expect), not the cross-entropy.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from locft_jax import model as M
from locft_jax.config import ModelConfig
from locft_jax.engine.dataset import EditDataset
from locft_jax.params import Params

CHUNK_ROWS = 16


@functools.partial(jax.jit, static_argnames=("config",))
def _distribution_stats(params: Params, config: ModelConfig, ids, mask, target_pos):
    """``(rᵀW, Σ r log r)`` of the model's next-token distribution ``r`` at ``target_pos`` [B, U]."""
    h = M.hidden_states(params, config, ids, mask)
    picked = M.pick_positions(h, target_pos)
    logr = jax.nn.log_softmax(M.lm_head(params, picked, config), axis=-1)
    r = jnp.exp(logr)
    w = M.lm_head_weight(params, config)
    # r in the head's dtype, float32 sums (as ``head_loss`` does): no float32 copy of a bf16 head
    expected = jnp.einsum("buv,vd->bud", r.astype(w.dtype), w, preferred_element_type=jnp.float32)
    return expected, (r * logr).sum(-1)


def with_soft_targets(params: Params, config: ModelConfig, ds: EditDataset) -> tuple[EditDataset, np.ndarray]:
    """``ds`` with its retain rows' targets made soft (ids ``V + s``), and the table of the ``S`` soft targets [S, D].

    Each retain row keeps its tokens as inputs (the unedited model's answer, teacher-forced); its
    targets become the unedited model's distributions at the positions its loss reads.
    """
    vocab = M.lm_head_weight(params, config).shape[0]
    rows = np.arange(ds.n_edits, len(ds))
    target_ids, offset = ds.target_ids.copy(), ds.loss_offset.copy()
    table: list[np.ndarray] = []
    n_soft = 0
    for start in range(0, len(rows), CHUNK_ROWS):
        chunk = rows[start : start + CHUNK_ROWS]
        padded = np.resize(chunk, CHUNK_ROWS)  # a fixed shape: one compile
        expected, neg_entropy = jax.device_get(
            _distribution_stats(params, config, ds.ids[padded], ds.mask[padded], ds.target_pos[padded])
        )
        for k, row in enumerate(chunk):
            used = ds.target_mask[row]
            target_ids[row, used] = vocab + n_soft + np.arange(used.sum())
            n_soft += int(used.sum())
            offset[row] = neg_entropy[k][used].mean()
            table.append(expected[k][used])
    if not table:
        raise ValueError("retain_loss='kl' needs retain rows")
    soft = np.concatenate(table).astype(np.float32)
    return dataclasses.replace(ds, target_ids=target_ids.astype(np.int32), loss_offset=offset), soft
