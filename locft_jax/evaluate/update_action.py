"""Where an edit acts: the weight change's output relative to the weight's, token by token.

An edited MLP tensor ``W₀ → W₀ + ΔW`` changes its output at a token whose input is ``k`` by
``ΔW k``. ``update_action`` reports ``‖ΔW k‖ / ‖W₀ k‖`` at every token of given texts (inputs from
the pre-edit model, as the null-space projection sees them): large on the tokens the edit
works through, ~0 on inputs it was kept off. It answers "why did this unrelated prompt move?"
without decoding anything — e.g. on SmolLM2 an edit that keeps the listed neighbouring subjects
at ~0.005 still acts on an unlisted country's name about half as strongly as on an edited one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from locft_jax.config import ModelConfig
from locft_jax.engine.null_space import KEY_KIND, input_kind, padded_chunks, tensor_inputs
from locft_jax.evaluate.metrics import Metric
from locft_jax.params import Params, flatten
from locft_jax.requests import EditRequest


@dataclasses.dataclass(frozen=True)
class TokenAction:
    """One text's tokens and, per changed tensor, ``‖ΔW k‖ / ‖W₀ k‖`` at each of them."""

    text: str
    tokens: list[str]
    action: dict[str, np.ndarray]  # tensor name → [tokens] float64

    def peak(self) -> float:
        """The largest action over tokens and tensors."""
        return max(float(a.max()) for a in self.action.values())


def changed_tensors(base: Params, edited: Params) -> dict[str, np.ndarray]:
    """The tensors of ``edited`` that differ from ``base``, by name (for ``update_action``)."""
    before, after = flatten(base), flatten(edited)
    changed = {name: np.asarray(after[name]) for name in before
               if not np.array_equal(np.asarray(before[name]), np.asarray(after[name]))}
    if not changed:
        raise ValueError("the edited params equal the base params: no update to measure")
    return changed


def update_action(
    base: Params,
    tensors: Mapping[str, Any],
    config: ModelConfig,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int = 256,
) -> list[TokenAction]:
    """``‖ΔW k‖ / ‖W₀ k‖`` at every token of each text, for every edited tensor.

    ``tensors``: the edited MLP tensors by name (``EditResult.trainable``, or ``changed_tensors``);
    ``base``: the pre-edit params, whose inputs ``k`` are used.
    """
    unsupported = [n for n in tensors if input_kind(n) is None]
    if unsupported:
        raise ValueError(
            f"update action needs MLP tensors ({', '.join(KEY_KIND)}); edited without a known input: "
            + ", ".join(unsupported)
        )
    names = list(tensors)
    before = flatten(base)
    # via the host: the edited tensors and the base may sit on different devices (or meshes)
    weights = {n: jnp.asarray(np.asarray(before[n], np.float32)) for n in names}
    deltas = {n: jnp.asarray(np.asarray(tensors[n], np.float32)) - weights[n] for n in names}
    layers = sorted({int(n.split(".")[2]) for n in names})
    out = []
    for start, chunk, batch in padded_chunks(tokenizer, texts, max_length):
        ratios: dict[str, np.ndarray] = {}
        for layer in layers:
            here = [n for n in names if int(n.split(".")[2]) == layer]
            kinds = tuple(sorted({input_kind(n) for n in here}))
            keys = tensor_inputs(base, config, layer, kinds, batch.ids, batch.mask)
            for name in here:
                k = np.asarray(keys[input_kind(name)])
                ratios[name] = np.asarray(_relative_change(k, weights[name], deltas[name]), np.float64)
        for row, ids in enumerate(chunk):
            out.append(TokenAction(
                texts[start + row],
                [tokenizer.decode([i]) for i in ids],
                {name: r[row, : len(ids)] for name, r in ratios.items()},
            ))
    return out


@jax.jit
def _relative_change(keys: jax.Array, weight: jax.Array, delta: jax.Array) -> jax.Array:
    """``‖ΔW k‖ / ‖W₀ k‖`` for each input row ``k`` of ``keys`` ([..., d_in]; weights [d_out, d_in])."""
    moved = jnp.linalg.norm(keys @ delta.T, axis=-1)
    return moved / jnp.maximum(jnp.linalg.norm(keys @ weight.T, axis=-1), 1e-30)


def action_metrics(
    base: Params, tensors: Mapping[str, Any], config: ModelConfig, tokenizer: Any, requests: Sequence[EditRequest]
) -> dict[str, Metric]:
    """Mean over the requests' edit prompts, and over their distinct locality prompts, of the
    largest per-token action (``TokenAction.peak``). Empty when an edited tensor is not an MLP
    tensor, or is not all on this host."""
    before = flatten(base)
    on_host = [getattr(v, "is_fully_addressable", True) for n in tensors for v in (tensors[n], before[n])]
    if any(input_kind(n) is None for n in tensors) or not all(on_host):
        return {}
    edit_prompts = [r.prompt for r in requests]
    locality = list(dict.fromkeys(p for r in requests for p in r.locality_prompts))
    peaks = [a.peak() for a in update_action(base, tensors, config, tokenizer, edit_prompts + locality)]
    groups = {"update_action/edit_prompts": peaks[: len(edit_prompts)],
              "update_action/locality_prompts": peaks[len(edit_prompts) :]}
    return {name: Metric(float(np.mean(p)), len(p), len(p)) for name, p in groups.items() if p}
