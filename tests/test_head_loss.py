"""The chunked LM-head loss equals log-softmax over full logits, in value and in gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from locft_jax.engine import EditConfig, edit
from locft_jax.engine.head_loss import chunked_logprobs
from tests.test_engine import FAST, ONE_DEVICE, REQUESTS, tiny  # noqa: F401  (tiny: fixture)


def _plain(h, w, targets):
    logp = jax.nn.log_softmax(jnp.einsum("pd,vd->pv", h, w), axis=-1)
    return jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]


@pytest.mark.parametrize("chunk", [64, 100, 1000])  # divides the vocabulary / leaves a tail / one tail chunk only
def test_chunked_head_equals_full_log_softmax_and_its_gradient(chunk):
    rng = np.random.default_rng(0)
    vocab, dim, n = 640, 24, 9
    h = jnp.asarray(rng.normal(size=(n, dim)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(vocab, dim)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, n), jnp.int32)
    weights = jnp.asarray(rng.normal(size=n), jnp.float32)  # a cotangent that is not all ones

    def loss(fn):
        return jax.value_and_grad(lambda h: (fn(h) * weights).sum())(h)

    want_value, want_grad = loss(lambda h: _plain(h, w, targets))
    value, grad = jax.jit(lambda: loss(lambda h: chunked_logprobs(h, w, w[targets], chunk)))()
    np.testing.assert_allclose(chunked_logprobs(h, w, w[targets], chunk), _plain(h, w, targets), rtol=1e-5)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_edit_with_the_chunked_head_equals_the_plain_head(tiny):  # noqa: F811
    cfg = EditConfig(layers=(2,), **FAST)
    plain = edit(tiny, REQUESTS, cfg.replace(head_chunk=0), mesh=ONE_DEVICE)
    chunked = edit(tiny, REQUESTS, cfg.replace(head_chunk=64), mesh=ONE_DEVICE)  # 4 chunks + a tail of 3
    name = "model.layers.2.mlp.down_proj.weight"
    np.testing.assert_allclose(np.asarray(chunked.trainable[name]), np.asarray(plain.trainable[name]), atol=1e-5)
    assert [e["loss"] for e in chunked.log] == pytest.approx([e["loss"] for e in plain.log], rel=1e-5)


def test_negative_head_chunk_is_a_clear_error():
    with pytest.raises(ValueError, match="head_chunk"):
        EditConfig(head_chunk=-1)
