"""KL retain rows: the loss is the KL divergence from the unedited model, exactly, on every path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from locft_jax import model as M
from locft_jax.augment import retain_requests
from locft_jax.engine import EditConfig, edit
from locft_jax.engine.dataset import prepare_dataset
from locft_jax.engine.forward import merge
from locft_jax.engine.head_loss import chunked_logprobs
from locft_jax.engine.locations import resolve_location
from locft_jax.engine.retain_kl import with_soft_targets
from locft_jax.engine.step import StepSpec, batch_loss
from locft_jax.params import flatten
from tests.test_engine import FAST, ONE_DEVICE, REQUESTS, tiny  # noqa: F401  (tiny: fixture)

NAME = "model.layers.2.mlp.down_proj.weight"
RETAIN_PROMPTS = ["The sky is", "Two plus two is", "My favourite food is"]


@pytest.mark.parametrize("chunk", [64, 1000])
def test_a_soft_target_gives_the_expected_log_probability_and_its_gradient(chunk):
    rng = np.random.default_rng(1)
    vocab, dim, n = 640, 24, 5
    h = jnp.asarray(rng.normal(size=(n, dim)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(vocab, dim)), jnp.float32)
    r = jax.nn.softmax(jnp.asarray(rng.normal(size=(n, vocab)) * 3, jnp.float32))

    def explicit(h):
        return (r * jax.nn.log_softmax(h @ w.T)).sum(-1).sum()

    want, want_grad = jax.value_and_grad(explicit)(h)
    got, grad = jax.value_and_grad(lambda h: chunked_logprobs(h, w, r @ w, chunk).sum())(h)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-5)


def _retain_only_loss(tiny, trainable, head_chunk):  # noqa: F811
    """The train step's loss on a batch of the retain rows alone (plain path, unpacked)."""
    keep = retain_requests(tiny.params, tiny.config, tiny.tokenizer, RETAIN_PROMPTS, 4)
    ds, soft = with_soft_targets(tiny.params, tiny.config, prepare_dataset(tiny.tokenizer, REQUESTS[:1], retain=keep))
    rows = np.arange(ds.n_edits, len(ds))
    batch = {k: jnp.asarray(getattr(ds, k)[rows]) for k in
             ("ids", "mask", "target_pos", "target_ids", "target_mask", "weight", "loss_offset")}
    batch["valid"] = jnp.ones(len(rows), bool)
    location = resolve_location(tiny.config, (2,), "mlp_down")
    spec = StepSpec(tiny.config, location, None, 0.0, 0.0, head_chunk)
    loss, grads = jax.jit(jax.value_and_grad(batch_loss), static_argnums=2)(
        trainable, tiny.params, spec, batch, jnp.asarray(soft))
    return loss, grads[NAME], ds, rows


@pytest.mark.parametrize("head_chunk", [0, 64])
def test_kl_retain_loss_is_zero_at_the_unedited_weights_and_the_kl_after_a_change(tiny, head_chunk):  # noqa: F811
    base = jnp.asarray(flatten(tiny.params)[NAME], jnp.float32)
    loss, grad, _, _ = _retain_only_loss(tiny, {NAME: base}, head_chunk)
    assert abs(float(loss)) < 1e-5 and float(jnp.abs(grad).max()) < 1e-5

    changed = base + 0.3 * jax.random.normal(jax.random.key(0), base.shape)
    loss, grad, ds, rows = _retain_only_loss(tiny, {NAME: changed}, head_chunk)
    edited = merge(tiny.params, {NAME: changed})
    logits = jax.jit(M.logits, static_argnums=1)
    kl = []
    for row in rows:  # the explicit KL from full logits, mean over the row's answer positions
        ids, mask = jnp.asarray(ds.ids[row : row + 1]), jnp.asarray(ds.mask[row : row + 1])
        pos = ds.target_pos[row][ds.target_mask[row]]
        before = jax.nn.log_softmax(logits(tiny.params, tiny.config, ids, mask)[0, pos])
        after = jax.nn.log_softmax(logits(edited, tiny.config, ids, mask)[0, pos])
        kl.append(float((jnp.exp(before) * (before - after)).sum(-1).mean()))
    # the loss is a cross-entropy minus an entropy (each ~ log V): float32 leaves ~1e-6 absolute
    assert float(loss) == pytest.approx(np.mean(kl), rel=1e-3, abs=2e-6)
    assert float(loss) > 1e-4 and float(jnp.abs(grad).max()) > 1e-5


def test_kl_retain_rows_train_alike_packed_cached_or_plain(tiny):  # noqa: F811
    keep = retain_requests(tiny.params, tiny.config, tiny.tokenizer, RETAIN_PROMPTS, 4)
    cfg = EditConfig(layers=(2,), retain_loss="kl", **FAST)
    fast = edit(tiny, REQUESTS, cfg, retain=keep, mesh=ONE_DEVICE)
    plain = edit(tiny, REQUESTS, cfg.replace(packing=False, prefix_cache=False, head_chunk=0), retain=keep,
                 mesh=ONE_DEVICE)
    np.testing.assert_allclose(np.asarray(fast.trainable[NAME]), np.asarray(plain.trainable[NAME]), atol=1e-5)
    ce = edit(tiny, REQUESTS, cfg.replace(retain_loss="ce"), retain=keep, mesh=ONE_DEVICE)
    assert not np.allclose(np.asarray(ce.trainable[NAME]), np.asarray(fast.trainable[NAME]))


def test_kl_retain_without_retain_rows_or_with_an_unknown_loss_is_an_error(tiny):  # noqa: F811
    with pytest.raises(ValueError, match="retain_loss='mse'.*valid: ce, kl"):
        EditConfig(retain_loss="mse")
    ds = prepare_dataset(tiny.tokenizer, REQUESTS)
    with pytest.raises(ValueError, match="needs retain rows"):
        with_soft_targets(tiny.params, tiny.config, ds)
