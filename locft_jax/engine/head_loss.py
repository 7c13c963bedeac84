"""Target log-probabilities with the LM head run over the vocabulary in chunks, gradient included.

The plain head (``forward.target_logprobs``) materialises ``[P, V]`` logits and their logsumexp,
and its backward pass builds a ``[P, V]`` cotangent and reads the ``[V, D]`` head weight a second
time. Here one pass over the weight, chunk by chunk, keeps a running maximum and sum of
exponentials (online softmax) and accumulates ``Σ_v p_v w_v``, so the forward pass already holds
the gradient with respect to the final-normed hidden states:

    d log p(t | h) / dh = w_t − Σ_v p_v w_v

and the custom VJP only scales it by the cotangent. A target is given by its vector ``w_t``: a
head row for a token, or ``Σ_v r_v w_v`` for a distribution ``r`` over the vocabulary, whose
``h·w_t − logsumexp`` is ``Σ_v r_v log p_v`` (``forward.target_vectors``; the KL retain rows).
The values are the plain path's up to float32 rounding (tested). Each chunk of the weight is used
by both of its matmuls while it is in cache, and nothing of size ``P × V`` is written: on CPU the
step's head costs about a third less.
The frozen head weight gets no gradient (it is never a trainable tensor).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

HEAD_CHUNK = 2048  # vocabulary rows per chunk (≈ 4.7 MB of float32 weight at hidden size 576)


def _chunk_stats(h: jax.Array, w: jax.Array, m: jax.Array, z: jax.Array, acc: jax.Array):
    """Fold one weight chunk ``w`` [C, D] into the running max ``m``, sum ``z`` and ``Σ p w`` ``acc``."""
    logits = jnp.einsum("pd,cd->pc", h, w, preferred_element_type=jnp.float32)
    m_new = jnp.maximum(m, logits.max(-1))
    scale = jnp.exp(m - m_new)
    p = jnp.exp(logits - m_new[:, None])
    acc = acc * scale[:, None] + jnp.einsum("pc,cd->pd", p.astype(w.dtype), w, preferred_element_type=jnp.float32)
    return m_new, z * scale + p.sum(-1), acc


def _forward(h: jax.Array, w: jax.Array, w_t: jax.Array, chunk: int):
    vocab, dim = w.shape
    chunk = min(chunk, vocab)
    full = vocab // chunk
    init = (jnp.full(h.shape[:1], -jnp.inf, jnp.float32), jnp.zeros(h.shape[:1], jnp.float32),
            jnp.zeros((h.shape[0], dim), jnp.float32))

    def body(i, carry):
        return _chunk_stats(h, jax.lax.dynamic_slice_in_dim(w, i * chunk, chunk), *carry)

    m, z, acc = jax.lax.fori_loop(0, full, body, init)
    if vocab % chunk:
        m, z, acc = _chunk_stats(h, w[full * chunk :], m, z, acc)
    target_logit = jnp.einsum("pd,pd->p", h, w_t, preferred_element_type=jnp.float32)
    logp = target_logit - m - jnp.log(z)
    return logp, w_t.astype(jnp.float32) - acc / z[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_logprobs(h: jax.Array, w: jax.Array, w_t: jax.Array, chunk: int = HEAD_CHUNK) -> jax.Array:
    """``h[p]·w_t[p] − logsumexp(h[p] @ w.T)`` for ``h`` [P, D], head weight ``w`` [V, D], targets ``w_t`` [P, D].

    With ``w_t = w[targets]``: ``log_softmax(h @ w.T)[p, targets[p]]``. Gradient w.r.t. ``h`` only
    (the head and the targets are frozen).
    """
    return _forward(h, w, w_t, chunk)[0]


def _fwd(h, w, w_t, chunk):
    logp, grad_h = _forward(h, w, w_t, chunk)
    return logp, (grad_h.astype(h.dtype), w, w_t)


def _bwd(chunk, residuals, cotangent):
    grad_h, w, w_t = residuals
    return cotangent[:, None].astype(grad_h.dtype) * grad_h, jnp.zeros_like(w), jnp.zeros_like(w_t)


chunked_logprobs.defvjp(_fwd, _bwd)
