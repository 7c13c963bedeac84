"""One jitted train step: gather the batch, loss and gradient of the trainable tensors, Adam.

Shapes are fixed per (sequence bucket, target bucket) — with packing, one packed shape per run;
the batch always has ``batch_rows`` slots (the last short batch is filled with padding slots that
``valid`` masks), so the whole run compiles a handful of times at most. The batch dim is sharded
over the mesh's data axis.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from locft_jax.config import ModelConfig
from locft_jax.engine.forward import (
    batch_mean,
    merge,
    per_sample_loss,
    per_slot_loss,
    suffix_hidden,
    target_logprobs,
)
from locft_jax.engine.locations import CachePoint, Location
from locft_jax.params import Params, get_leaf
from locft_jax.sharding import batch_sharding, replicated

Trainable = dict[str, jax.Array]
TOKEN_INPUTS = ("ids", "h", "act")  # per-token model inputs in the store (by request and position)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about the step (hashable: a jit static argument)."""

    config: ModelConfig
    location: Location
    point: CachePoint | None
    skip_step_loss: float
    norm_constraint: float
    head_chunk: int = 0  # > 0: the LM head runs in vocabulary chunks of this size (``head_loss``)
    # the projectors also act on the gradient, before the optimizer (the hard null space: Adam's
    # moments then see only the directions the update may take; see ``null_space``)
    project_gradients: bool = False


def batch_loss(
    trainable: Trainable, params: Params, spec: StepSpec, batch: dict[str, jax.Array], soft: jax.Array | None = None
) -> jax.Array:
    """The reference loss: masked target-token CE, mean per sample, then mean over real rows.

    Rows carry a weight: 1 for edits (the reference loss exactly), ``retain_weight`` for retain rows.
    KL retain rows (``retain_kl``) have soft targets (rows of ``soft``) and a ``loss_offset`` that
    turns their cross-entropy into the KL divergence.
    """
    merged = merge(params, {k: v.astype(get_leaf(params, k).dtype) for k, v in trainable.items()})
    inputs = {k: batch[k] for k in TOKEN_INPUTS if k in batch}
    packed = "target_at" in batch  # packed: target tokens laid end to end, at flat positions of the rows
    picked = suffix_hidden(merged, spec.config, spec.location, spec.point, inputs, batch["mask"],
                           batch["target_at"] if packed else batch["target_pos"],
                           batch.get("positions"), batch.get("segments"))
    logp = target_logprobs(merged, spec.config, picked, batch["target_ids"], spec.head_chunk, soft)
    if packed:
        per_sample = per_slot_loss(logp, batch["target_slot"], batch["valid"].shape[0])
    else:
        per_sample = per_sample_loss(logp, batch["target_mask"])
    return batch_mean((per_sample + batch["loss_offset"]) * batch["weight"], batch["valid"])


def gather_batch(store: dict[str, jax.Array], feed: dict[str, jax.Array], seq_len: int, tgt_len: int, mesh: Mesh):
    """The batch's arrays from the store, sharded over the data axis.

    ``feed["index"]``: the store row of each batch slot; ``feed["valid"]``: which slots are real.
    Unpacked, every per-request array is cut to the batch's buckets (``seq_len``, ``tgt_len``).
    Packed (``feed`` carries a layout from ``BatchFeeder``: ``slot``/``pos`` per token and the flat
    targets ``target_at``/``target_ids``/``target_slot``), token inputs are laid out in its rows.
    """
    index = feed["index"]
    if "slot" in feed:
        source_row = jnp.take(index, jnp.maximum(feed["slot"], 0))  # [R, L]: store row of each token
        out = {k: feed[k] for k in ("valid", "target_at", "target_ids", "target_slot")}
        out.update(mask=feed["slot"] >= 0, segments=feed["slot"], positions=feed["pos"],
                   weight=jnp.take(store["weight"], index), loss_offset=jnp.take(store["loss_offset"], index))
        out.update({k: store[k][source_row, feed["pos"]] for k in TOKEN_INPUTS if k in store})
    else:
        out = {"valid": feed["valid"]}
        for key, value in store.items():
            picked = jnp.take(value, index, axis=0)
            out[key] = picked[:, : tgt_len if key.startswith("target") else seq_len] if picked.ndim > 1 else picked
    return {k: jax.lax.with_sharding_constraint(v, batch_sharding(mesh, v.ndim)) for k, v in out.items()}


def make_train_step(spec: StepSpec, tx: optax.GradientTransformation, mesh: Mesh, state_shardings: tuple):
    """``step(trainable, opt_state, params, base, projectors, soft, store, feed, seq_len=, tgt_len=)``.

    ``feed``: the batch's slots (``index``, ``valid``, and a packing layout when packed; see
    ``gather_batch``).

    ``projectors``: name → input-side projector applied to that tensor's update (``null_space``;
    an empty dict when off), and with ``spec.project_gradients`` to its gradient as well. ``soft``:
    the soft-target table of KL retain rows (``retain_kl``), or None.
    Returns ``(trainable, opt_state, loss, applied)``, the state with ``state_shardings``. A step
    whose loss is below ``skip_step_loss`` or not finite leaves weights and optimizer state
    untouched, so a NaN never reaches the weights.
    """

    scalar = replicated(mesh)

    @functools.partial(
        jax.jit,
        static_argnames=("seq_len", "tgt_len"),
        donate_argnums=(0, 1),
        out_shardings=(*state_shardings, scalar, scalar),
    )
    def step(trainable, opt_state, params, base, projectors, soft, store, feed, *, seq_len: int, tgt_len: int):
        batch = gather_batch(store, feed, seq_len, tgt_len, mesh)
        # Gradients of the trainable tensors only; the masked optimizer sees them in the full
        # params structure, where the frozen leaves are placeholders it maps to zero updates
        # (never used, so XLA drops that work).
        loss, grads = jax.value_and_grad(batch_loss)(trainable, params, spec, batch, soft)
        if spec.project_gradients:
            grads = {n: g @ projectors[n] if n in projectors else g for n, g in grads.items()}
        updates, new_opt = tx.update(merge(params, grads), opt_state)
        flat_updates = {name: get_leaf(updates, name) for name in trainable}
        flat_updates = {n: u @ projectors[n] if n in projectors else u for n, u in flat_updates.items()}
        new = optax.apply_updates(trainable, flat_updates)
        if spec.norm_constraint > 0:
            eps = spec.norm_constraint
            new = jax.tree.map(lambda w, b: jnp.clip(w, b - eps, b + eps), new, base)
        applied = jnp.isfinite(loss) & (loss >= spec.skip_step_loss)
        keep = functools.partial(jax.tree.map, lambda n, o: jnp.where(applied, n, o))
        return keep(new, trainable), keep(new_opt, opt_state), loss, applied

    return step
