"""LoRA at LocFT's location: the chosen module's weights become ``W + (alpha / r) · B @ A``.

The honest comparison changes one thing only, what trains: the tokenized data, the prefix cache,
the loss (``engine.step.batch_loss``), the seeded shuffle and batches, the learning-rate
schedule, step skipping and early stopping are the engine's; the gradient is taken w.r.t. the
adapters ``A`` [r, in] and ``B`` [out, r] instead of ``W`` [out, in]. ``B`` starts at zero (peft's
init), so the edit starts from the unedited model. Only 2-D weights get adapters: norm weights and
biases of the module stay frozen; FT-M's ``norm_constraint`` does not apply. The loops below
follow the engine's breadth-first and depth-first loops (``engine.loop``), whose internals work on
full-weight optimizer state. The result holds merged params, so it is evaluated and exported
exactly like an engine edit.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from locft_jax.engine.config import EditConfig
from locft_jax.engine.dataset import batches, epoch_order, prepare_dataset
from locft_jax.engine.forward import merge
from locft_jax.engine.locations import resolve_location, trainable_names
from locft_jax.engine.loop import EditResult, NonFiniteLossError, place_on_mesh
from locft_jax.engine.optimizer import learning_rate
from locft_jax.engine.prefix_cache import BatchFeeder, build_store
from locft_jax.engine.step import StepSpec, batch_loss, gather_batch
from locft_jax.loading import Model
from locft_jax.params import flatten
from locft_jax.requests import EditRequest
from locft_jax.sharding import make_mesh, replicated

Adapters = dict[str, dict[str, jax.Array]]  # weight name → {"a": [r, in], "b": [out, r]}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be >= 1, got {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def init_adapters(weights: dict[str, jax.Array], lora: LoraConfig, seed: int) -> Adapters:
    """``A`` uniform in ±1/sqrt(in) (peft's kaiming-uniform bound), ``B`` zero."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, w in weights.items():
        rows, cols = w.shape
        bound = 1.0 / np.sqrt(cols)
        a = rng.uniform(-bound, bound, (lora.rank, cols)).astype(np.float32)
        out[name] = {"a": jnp.asarray(a), "b": jnp.zeros((rows, lora.rank), jnp.float32)}
    return out


def merged_weights(base: dict[str, jax.Array], adapters: Adapters, scale: float) -> dict[str, jax.Array]:
    return {n: w + scale * adapters[n]["b"] @ adapters[n]["a"] for n, w in base.items()}


def make_lora_step(spec: StepSpec, scale: float, tx: optax.GradientTransformation, mesh: Mesh):
    """The engine's train step with adapters in place of weights; ``base`` holds the frozen ``W``."""
    everything = replicated(mesh)  # adapters are small: every device holds them whole

    @functools.partial(
        jax.jit, static_argnames=("seq_len", "tgt_len"), donate_argnums=(0, 1), out_shardings=everything
    )
    def step(adapters, opt_state, params, base, store, feed, *, seq_len: int, tgt_len: int):
        batch = gather_batch(store, feed, seq_len, tgt_len, mesh)

        def loss_of(adapters):
            return batch_loss(merged_weights(base, adapters, scale), params, spec, batch)

        loss, grads = jax.value_and_grad(loss_of)(adapters)
        updates, new_opt = tx.update(grads, opt_state, adapters)
        new = optax.apply_updates(adapters, updates)
        applied = jnp.isfinite(loss) & (loss >= spec.skip_step_loss)
        keep = functools.partial(jax.tree.map, lambda n, o: jnp.where(applied, n, o))
        return keep(new, adapters), keep(new_opt, opt_state), loss, applied

    return step


def lora_edit(
    model: Model,
    requests: Sequence[EditRequest],
    config: EditConfig,
    lora: LoraConfig = LoraConfig(),
    *,
    mesh: Mesh | None = None,
) -> EditResult:
    """Train LoRA adapters on ``config``'s location; ``.params`` has ``W + scale·BA`` merged in."""
    start_time = time.perf_counter()
    mesh = mesh or make_mesh(config.model_parallel)
    params = place_on_mesh(model.params, model.config, mesh)
    location = resolve_location(model.config, config.layers, config.module)
    ds = prepare_dataset(model.tokenizer, requests, config.objective, config.max_length, config.on_bad_record)
    point = location.cache_point() if config.prefix_cache else None
    store = build_store(params, model.config, location, point, ds, mesh, config.prefix_cache_device_bytes)

    flat = flatten(params)
    names = [n for n in trainable_names(model.config, location) if flat[n].ndim == 2]
    everything = replicated(mesh)
    base = {n: jax.device_put(jnp.asarray(flat[n], jnp.float32), everything) for n in names}
    adapters = jax.device_put(init_adapters(base, lora, config.seed), everything)

    depth_first = config.pipeline == "df"
    steps_per_epoch = -(-len(ds) // config.batch_size)
    adam = optax.adam(learning_rate(config, config.epochs if depth_first else steps_per_epoch * config.epochs))
    if config.grad_clip > 0:
        adam = optax.chain(optax.clip_by_global_norm(config.grad_clip), adam)
    spec = StepSpec(model.config, location, point, config.skip_step_loss, 0.0)
    step = make_lora_step(spec, lora.scale, adam, mesh)
    feed = BatchFeeder(store, ds, 1 if depth_first else config.batch_size, mesh)

    def train(adapters, opt_state, rows: np.ndarray):
        arrays, batch_feed, seq_len, tgt_len = feed(rows)
        return step(adapters, opt_state, params, base, arrays, batch_feed, seq_len=seq_len, tgt_len=tgt_len)

    # fresh state placed like the step's outputs (else each re-init would compile the step again)
    def fresh_state(adapters):
        return jax.device_put(adam.init(adapters), everything)

    loop = _depth_first if depth_first else _breadth_first
    adapters, log = loop(train, fresh_state, adapters, len(ds), config)
    trained = merged_weights(base, adapters, lora.scale)
    params = merge(params, {n: v.astype(flat[n].dtype) for n, v in trained.items()})
    seconds = time.perf_counter() - start_time
    return EditResult(params, trained, location, log, ds.skipped, step._cache_size(), seconds, store.cache_bytes)


def _log_entry(index: int, losses: list, applied: list, t0: float, config: EditConfig) -> dict[str, Any]:
    losses_h = np.asarray(jax.device_get(losses), np.float64)
    if not np.isfinite(losses_h).all() and config.on_bad_record == "error":
        raise NonFiniteLossError(f"LoRA: non-finite loss in epoch/request {index}; weights kept from before")
    finite = losses_h[np.isfinite(losses_h)]
    return {
        "epoch": index,
        "loss": float(finite.mean()) if finite.size else float("nan"),
        "steps": len(losses),
        "steps_skipped": int((~np.asarray(jax.device_get(applied))).sum()),
        "seconds": time.perf_counter() - t0,
    }


def _breadth_first(train, fresh_state, adapters, n: int, config: EditConfig):
    log, opt_state = [], fresh_state(adapters)
    for epoch in range(config.epochs):
        t0, losses, applied = time.perf_counter(), [], []
        for rows in batches(epoch_order(n, config.seed, epoch), config.batch_size):
            adapters, opt_state, loss, ok = train(adapters, opt_state, rows)
            losses.append(loss)
            applied.append(ok)
        log.append(_log_entry(epoch, losses, applied, t0, config))
        if config.early_stop_loss > 0 and log[-1]["loss"] < config.early_stop_loss:
            break
    return adapters, log


def _depth_first(train, fresh_state, adapters, n: int, config: EditConfig):
    """Each request alone to convergence (fresh Adam state, same adapters), one after another."""
    log = []
    for index in range(n):
        t0, losses, applied, opt_state = time.perf_counter(), [], [], fresh_state(adapters)
        for _ in range(config.epochs):
            adapters, opt_state, loss, ok = train(adapters, opt_state, np.array([index]))
            losses.append(loss)
            applied.append(ok)
            if config.early_stop_loss > 0 and float(loss) < config.early_stop_loss:
                break
        log.append(_log_entry(index, losses, applied, t0, config))
    return adapters, log
