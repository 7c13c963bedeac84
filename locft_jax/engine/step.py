"""One jitted train step: gather the batch, loss and gradient of the trainable tensors, Adam.

Shapes are fixed per (sequence bucket, target bucket); the batch is always ``batch_rows`` rows
(the last short batch is filled with padding rows that ``row_valid`` masks), so the whole run
compiles once per bucket pair. The batch dim is sharded over the mesh's data axis.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from locft_jax.config import ModelConfig
from locft_jax.engine.forward import batch_mean, merge, per_sample_loss, suffix_hidden, target_logprobs
from locft_jax.engine.locations import CachePoint, Location
from locft_jax.params import Params, get_leaf
from locft_jax.sharding import batch_sharding, replicated

Trainable = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about the step (hashable: a jit static argument)."""

    config: ModelConfig
    location: Location
    point: CachePoint | None
    skip_step_loss: float
    norm_constraint: float


def batch_loss(
    trainable: Trainable, params: Params, spec: StepSpec, batch: dict[str, jax.Array], row_valid: jax.Array
) -> jax.Array:
    """The reference loss: masked target-token CE, mean per sample, then mean over real rows.

    Rows carry a weight: 1 for edits (the reference loss exactly), ``retain_weight`` for retain rows.
    """
    merged = merge(params, {k: v.astype(get_leaf(params, k).dtype) for k, v in trainable.items()})
    inputs = {k: batch[k] for k in ("ids", "h", "act") if k in batch}
    hidden = suffix_hidden(merged, spec.config, spec.location, spec.point, inputs, batch["mask"])
    logp = target_logprobs(merged, spec.config, hidden, batch["target_pos"], batch["target_ids"])
    return batch_mean(per_sample_loss(logp, batch["target_mask"]) * batch["weight"], row_valid)


def gather_batch(store: dict[str, jax.Array], rows: jax.Array, seq_len: int, tgt_len: int, mesh: Mesh) -> dict:
    """Rows of the store, cut to the batch's buckets, sharded over the data axis."""
    out = {}
    for key, value in store.items():
        picked = jnp.take(value, rows, axis=0)
        if picked.ndim > 1:
            picked = picked[:, : tgt_len if key.startswith("target") else seq_len]
        out[key] = jax.lax.with_sharding_constraint(picked, batch_sharding(mesh, picked.ndim))
    return out


def make_train_step(spec: StepSpec, tx: optax.GradientTransformation, mesh: Mesh, state_shardings: tuple):
    """``step(trainable, opt_state, params, base, projectors, store, rows, row_valid, seq_len=, tgt_len=)``.

    ``projectors``: name → input-side projector applied to that tensor's update (``null_space``;
    an empty dict when off). Returns ``(trainable, opt_state, loss, applied)``, the state with
    ``state_shardings``. A step whose loss is below ``skip_step_loss`` or not finite leaves
    weights and optimizer state untouched, so a NaN never reaches the weights.
    """

    scalar = replicated(mesh)

    @functools.partial(
        jax.jit,
        static_argnames=("seq_len", "tgt_len"),
        donate_argnums=(0, 1),
        out_shardings=(*state_shardings, scalar, scalar),
    )
    def step(trainable, opt_state, params, base, projectors, store, rows, row_valid, *, seq_len: int, tgt_len: int):
        batch = gather_batch(store, rows, seq_len, tgt_len, mesh)
        # Gradients of the trainable tensors only; the masked optimizer sees them in the full
        # params structure, where the frozen leaves are placeholders it maps to zero updates
        # (never used, so XLA drops that work).
        loss, grads = jax.value_and_grad(batch_loss)(trainable, params, spec, batch, row_valid)
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
