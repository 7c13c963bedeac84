"""``update_action``: the edit's relative output change at each token, against the model functions."""

from __future__ import annotations

import numpy as np
import pytest

from locft_jax import load_model
from locft_jax.engine import EditConfig, edit
from locft_jax.evaluate.update_action import action_metrics, changed_tensors, update_action
from locft_jax.params import flatten, unflatten
from locft_jax.requests import EditRequest
from tests.test_engine import FAST, ONE_DEVICE
from tests.test_null_space import DOWN, UP, _inputs

TEXTS = ["The capital of Atlantis is", "Two plus two is four.", "A"]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(tiny_llama_dir)


def _with(model, changes: dict[str, np.ndarray]):
    flat = dict(flatten(model.params))
    flat.update({name: np.asarray(flat[name]) + delta for name, delta in changes.items()})
    return unflatten(flat, model.config)


def test_update_action_is_the_relative_output_change_at_each_token(tiny):
    rng = np.random.default_rng(0)
    flat = flatten(tiny.params)
    deltas = {name: rng.normal(size=np.shape(flat[name])).astype(np.float32) * 0.01 for name in (DOWN, UP)}
    tensors = changed_tensors(tiny.params, _with(tiny, deltas))
    assert sorted(tensors) == sorted(deltas)
    actions = update_action(tiny.params, tensors, tiny.config, tiny.tokenizer, TEXTS)
    assert [a.text for a in actions] == TEXTS
    for text, got in zip(TEXTS, actions, strict=True):
        act, normed = _inputs(tiny, text, 2)
        assert len(got.tokens) == len(act) and "".join(got.tokens) == tiny.tokenizer.decode(
            tiny.tokenizer.encode(text, add_special_tokens=False))
        for name, keys in ((DOWN, act), (UP, normed)):
            weight = np.asarray(flat[name], np.float64)
            expected = np.linalg.norm(keys @ deltas[name].T, axis=-1) / np.linalg.norm(keys @ weight.T, axis=-1)
            np.testing.assert_allclose(got.action[name], expected, rtol=1e-4)
        assert got.peak() == pytest.approx(max(got.action[DOWN].max(), got.action[UP].max()))


def test_update_action_is_zero_off_the_change_and_names_what_it_cannot_measure(tiny):
    keys = _inputs(tiny, TEXTS[0], 2)[0]
    # a change along a direction orthogonal to every input of the first text: no action there
    direction = np.linalg.svd(keys)[2][-1]
    assert np.abs(keys @ direction).max() < 1e-4 * np.linalg.norm(keys)
    weight = np.asarray(flatten(tiny.params)[DOWN])
    edited = {DOWN: weight + np.outer(np.ones(weight.shape[0]), direction).astype(np.float32)}
    (action,) = update_action(tiny.params, edited, tiny.config, tiny.tokenizer, TEXTS[:1])
    assert action.peak() < 1e-3
    with pytest.raises(ValueError, match="equal the base params"):
        changed_tensors(tiny.params, tiny.params)
    attention = "model.layers.1.self_attn.q_proj.weight"
    with pytest.raises(ValueError, match=f"without a known input: {attention}"):
        update_action(tiny.params, changed_tensors(tiny.params, _with(tiny, {attention: np.float32(1.0)})),
                      tiny.config, tiny.tokenizer, TEXTS)


def test_action_metrics_average_the_peaks_over_edit_and_distinct_locality_prompts(tiny):
    requests = [
        EditRequest("The capital of Atlantis is", "Poseidonia", locality_prompts=("Two plus two is",),
                    locality_answers=("four",)),
        EditRequest("The capital of Lemuria is", "Mu", locality_prompts=("Two plus two is",),
                    locality_answers=("four",)),
    ]
    result = edit(tiny, requests, EditConfig(layers=(2,), **FAST), mesh=ONE_DEVICE)
    got = action_metrics(tiny.params, result.trainable, tiny.config, tiny.tokenizer, requests)
    peaks = [a.peak() for a in update_action(tiny.params, result.trainable, tiny.config, tiny.tokenizer,
                                             [r.prompt for r in requests] + ["Two plus two is"])]
    assert got["update_action/edit_prompts"].value == pytest.approx(np.mean(peaks[:2]))
    assert got["update_action/edit_prompts"].count == 2
    assert got["update_action/locality_prompts"].value == pytest.approx(peaks[2])
    assert got["update_action/locality_prompts"].count == 1  # the shared prompt counted once
    attention = edit(tiny, requests, EditConfig(layers=(2,), module="attn", **FAST), mesh=ONE_DEVICE)
    assert action_metrics(tiny.params, attention.trainable, tiny.config, tiny.tokenizer, requests) == {}
