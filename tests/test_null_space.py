"""Null-space constrained edits: the weight change leaves the preserved texts' inputs untouched."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from locft_jax import load_model
from locft_jax import model as M
from locft_jax.engine import EditConfig, edit
from locft_jax.engine.null_space import damping_matrix, null_space_projector, subject_span
from locft_jax.requests import EditRequest, RequestError
from locft_jax.tokens import encode_prompt
from tests.test_engine import FAST, ONE_DEVICE, REQUESTS

PRESERVE = ["The sky is blue.", "Two plus two is four.", "Paris is a city in France."]
DOWN = "model.layers.2.mlp.down_proj.weight"
UP = "model.layers.2.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(tiny_llama_dir)


def _inputs(model, text: str, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(down_proj input, up_proj input) at every token of ``text``, straight from the model functions."""
    ids = jnp.asarray([encode_prompt(model.tokenizer, text)])
    mask = jnp.ones_like(ids)
    ctx = M.make_context(model.config, mask)
    h = M.run_layers(model.params, M.embed(model.params, ids), ctx, model.config, stop=layer)
    lp = model.params["model"]["layers"][layer]
    h = M.attention_block(lp, h, ctx, model.config)
    normed = M.rms_norm(h, lp["post_attention_layernorm"]["weight"], model.config.rms_norm_eps)
    return np.asarray(M.mlp_activation(lp["mlp"], normed)[0]), np.asarray(normed[0])


def test_projector_is_the_orthogonal_projector_onto_small_eigen_directions():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(5, 12))  # rank 5 of 12
    proj = null_space_projector(keys.T @ keys, 1e-6)
    np.testing.assert_allclose(proj, proj.T, atol=1e-6)
    np.testing.assert_allclose(proj @ proj, proj, atol=1e-5)
    assert np.trace(proj) == pytest.approx(7, abs=1e-4)
    np.testing.assert_allclose(keys @ proj, 0, atol=1e-5)


def test_damping_matrix_scales_each_eigen_direction_by_tol_over_its_share_plus_tol():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(5, 12)) * np.array([10.0, 3.0, 1.0, 1.0, 1.0])[:, None]  # rank 5 of 12
    cov = keys.T @ keys
    tol = 1e-2
    damp = damping_matrix(cov, tol)
    np.testing.assert_allclose(damp, damp.T, atol=1e-6)
    values, vectors = np.linalg.eigh(cov)
    for value, vector in zip(values, vectors.T, strict=True):
        expected = tol / (max(value, 0.0) / values.max() + tol)
        np.testing.assert_allclose(damp @ vector, expected * vector, atol=1e-5)
    null = null_space_projector(cov, 1e-9)
    np.testing.assert_allclose(damp @ null, null, atol=1e-5)  # unused directions pass unchanged
    top = vectors[:, -1]
    assert top @ damp @ top == pytest.approx(tol / (1 + tol), rel=1e-4)


def test_soft_mode_moves_preserved_outputs_less_than_free_training_and_still_learns(tiny):
    cfg = EditConfig(layers=(2,), module="mlp_down", **{**FAST, "lr": 5e-2, "epochs": 10})
    free = edit(tiny, REQUESTS, cfg, mesh=ONE_DEVICE)
    soft = edit(tiny, REQUESTS, cfg.replace(null_space_tol=1e-3, null_space_mode="soft"), preserve=PRESERVE,
                mesh=ONE_DEVICE)
    assert soft.log[-1]["loss"] < soft.log[0]["loss"] - 0.2
    base = np.asarray(tiny.params["model"]["layers"][2]["mlp"]["down_proj"]["weight"])
    for text in PRESERVE:
        keys = _inputs(tiny, text, 2)[0]
        moved = {name: np.abs((np.asarray(r.trainable[DOWN]) - base) @ keys.T).max()
                 for name, r in (("free", free), ("soft", soft))}
        assert moved["soft"] < 0.2 * moved["free"], moved
    with pytest.raises(ValueError, match="null_space_mode='sharp'; valid: hard, soft"):
        cfg.replace(null_space_mode="sharp")


@pytest.mark.parametrize("module,names", [("mlp_down", [DOWN]), ("mlp", [DOWN, UP])])
def test_update_does_not_act_on_preserved_inputs_and_still_learns(tiny, module, names):
    cfg = EditConfig(layers=(2,), module=module, **{**FAST, "lr": 5e-2, "epochs": 10}, null_space_tol=1e-7)
    free = edit(tiny, REQUESTS, cfg.replace(null_space_tol=0.0), mesh=ONE_DEVICE)
    projected = edit(tiny, REQUESTS, cfg, preserve=PRESERVE, mesh=ONE_DEVICE)
    assert projected.log[-1]["loss"] < projected.log[0]["loss"] - 0.2  # the tiny random model learns slowly
    base = {n: np.asarray(tiny.params["model"]["layers"][2]["mlp"][n.split(".")[-2]]["weight"]) for n in names}
    for text in PRESERVE:
        act, normed = _inputs(tiny, text, 2)
        for name in names:
            keys = act if "down_proj" in name else normed
            # lr 5e-2 makes the update ~10x the tiny random weights: measured 2026-11-29, free training
            # moves the preserved outputs by 20-32x their size, the projected one by 3e-5 (down_proj)
            # and 1.6e-3 (up_proj: 64-dim inputs, few null directions, each at ≤ tol·λmax)
            for result, bound in ((projected, 1e-2), (free, None)):
                change = (np.asarray(result.trainable[name]) - base[name]) @ keys.T
                ratio = np.abs(change).max() / np.abs(base[name] @ keys.T).max()
                if bound is None:
                    assert ratio > 1.0  # without the projection the same training moves these outputs
                else:
                    assert ratio < bound


def test_null_space_needs_texts_and_a_supported_module(tiny):
    cfg = EditConfig(layers=(2,), **FAST, null_space_tol=1e-6)
    with pytest.raises(ValueError, match="at least one text"):
        edit(tiny, REQUESTS, cfg, mesh=ONE_DEVICE)
    with pytest.raises(ValueError, match="null_space_tol is 0"):
        edit(tiny, REQUESTS, cfg.replace(null_space_tol=0.0), preserve=PRESERVE, mesh=ONE_DEVICE)
    with pytest.raises(ValueError, match="valid: mlp_down, mlp_up, mlp"):
        edit(tiny, REQUESTS, cfg.replace(module="attn"), preserve=PRESERVE, mesh=ONE_DEVICE)


SUBJECT_EDITS = [
    EditRequest("The capital of Atlantis is", "Poseidonia", subject="Atlantis"),
    EditRequest("Mount Olympus is located in", "Greece", subject="Mount Olympus"),
]
NEIGHBOUR = EditRequest("The capital of Lemuria is", "Mu", subject="Lemuria")


def test_subject_span_is_the_subject_tokens_and_bad_records_are_named(tiny):
    tok = tiny.tokenizer
    for request in (*SUBJECT_EDITS, NEIGHBOUR):
        start, end = subject_span(tok, request, "record 0")
        ids = encode_prompt(tok, request.prompt)
        assert tok.decode(ids[start:end]).strip() == request.subject
        assert tok.decode(ids[:start]) + tok.decode(ids[start:]) == tok.decode(ids)
    with pytest.raises(RequestError, match="record 4: field 'subject'"):
        subject_span(tok, EditRequest("The capital of Mu is", "X"), "record 4")
    with pytest.raises(RequestError, match="preserve_subjects 2: subject 'Oz' does not occur"):
        subject_span(tok, EditRequest("The capital of Mu is", "X", subject="Oz"), "preserve_subjects 2")


def test_subject_scope_keeps_the_update_off_the_template_and_other_subjects(tiny):
    """Keys of the edit prompts' non-subject tokens and of a neighbour's subject: unmoved; the subject's: moved."""
    cfg = EditConfig(layers=(2,), **{**FAST, "lr": 5e-2, "epochs": 10}, null_space_tol=1e-7, null_space_scope="subject")
    result = edit(tiny, SUBJECT_EDITS, cfg, preserve_subjects=[NEIGHBOUR], mesh=ONE_DEVICE)
    assert result.log[-1]["loss"] < result.log[0]["loss"] - 0.2
    base = np.asarray(tiny.params["model"]["layers"][2]["mlp"]["down_proj"]["weight"])
    delta = np.asarray(result.trainable[DOWN]) - base
    moved = {}
    for request, kind in [*((r, "edit") for r in SUBJECT_EDITS), (NEIGHBOUR, "neighbour")]:
        keys = _inputs(tiny, request.prompt, 2)[0]
        start, end = subject_span(tiny.tokenizer, request, "record")
        subject = np.zeros(len(keys), bool)
        subject[start:end] = True
        scale = np.abs(base @ keys.T).max()
        for where, rows in (("subject", subject), ("template", ~subject)):
            moved[kind, where] = max(moved.get((kind, where), 0.0), np.abs(delta @ keys[rows].T).max() / scale)
    assert moved["edit", "template"] < 1e-3 and moved["neighbour", "subject"] < 1e-3, moved
    assert moved["edit", "subject"] > 1e-2, moved  # what the edit acts through


def test_subject_scope_needs_the_null_space_subjects_and_names_a_record_without_one(tiny):
    cfg = EditConfig(layers=(2,), **FAST, null_space_tol=1e-6, null_space_scope="subject")
    with pytest.raises(ValueError, match="null_space_scope='subject' needs null_space_tol > 0"):
        edit(tiny, SUBJECT_EDITS, cfg.replace(null_space_tol=0.0), mesh=ONE_DEVICE)
    with pytest.raises(ValueError, match="preserve_subjects were given but null_space_tol is 0"):
        edit(tiny, SUBJECT_EDITS, cfg.replace(null_space_tol=0.0, null_space_scope="all"),
             preserve_subjects=[NEIGHBOUR], mesh=ONE_DEVICE)
    with pytest.raises(ValueError, match="null_space_scope is 'all'"):
        edit(tiny, SUBJECT_EDITS, cfg.replace(null_space_scope="all"), preserve=PRESERVE,
             preserve_subjects=[NEIGHBOUR], mesh=ONE_DEVICE)
    with pytest.raises(RequestError, match="record 1: field 'subject'"):
        edit(tiny, [SUBJECT_EDITS[0], EditRequest("Water boils at", "ninety")], cfg, mesh=ONE_DEVICE)
    with pytest.raises(ValueError, match="null_space_scope='everything'; valid: all, subject"):
        cfg.replace(null_space_scope="everything")


@pytest.fixture(scope="module")
def smollm2_capitals(smollm2):
    """The real model, 16 capital counterfactuals, their pre-edit snapshot, and 50 neighbours + general text."""
    from pathlib import Path

    from locft_jax.augment import preserve_texts, retain_requests
    from locft_jax.data import load_requests, load_texts
    from locft_jax.evaluate import snapshot

    data = Path(__file__).parents[1] / "experiments" / "data"
    model = smollm2
    records = load_requests(data / "country_capitals.json").requests
    edits = records[:16]
    held_out = {p for r in edits for p in r.locality_prompts}
    neighbours = [r.prompt for r in records[16:] if r.prompt not in held_out][:50]
    preserve = preserve_texts(retain_requests(model.params, model.config, model.tokenizer, neighbours))
    preserve += load_texts(data / "preserve.txt")
    pre = snapshot(model.params, model.config, model.tokenizer, edits, ("teacher_forced",))
    return model, edits, preserve, pre


LAYER3 = EditConfig(layers=(3,), lr=1e-2, batch_size=8, epochs=40)


def _trained(setup, config: EditConfig):
    model, edits, preserve, _ = setup
    return edit(model, edits, config, preserve=preserve if config.null_space_tol > 0 else (), mesh=ONE_DEVICE)


@pytest.fixture(scope="module")
def layer3_plain(smollm2_capitals):
    """The plain recipe at layer 3 on the 16 edits: the baseline of two tests below, trained once."""
    return _trained(smollm2_capitals, LAYER3)


def _teacher_forced_scores(setup, results) -> dict[str, dict[str, float]]:
    from locft_jax.evaluate import evaluate_requests

    model, edits, _, pre = setup
    scores = {}
    for name, result in results.items():
        post = evaluate_requests(result.params, model.config, model.tokenizer, edits, pre=pre,
                                 styles=("teacher_forced",)).post
        scores[name] = {k: post[f"teacher_forced/{k}"].value for k in ("reliability", "locality")}
    return scores


@pytest.mark.slow
def test_null_space_keeps_neighbour_facts_better_than_the_plain_recipe_on_smollm2(smollm2_capitals, layer3_plain):
    """Issue 7's check on the real model: 16 capital counterfactuals, layer 3, same training."""
    null_space = _trained(smollm2_capitals, LAYER3.replace(null_space_tol=1e-3))
    scores = _teacher_forced_scores(smollm2_capitals, {"plain": layer3_plain, "null-space": null_space})
    assert scores["null-space"]["locality"] > scores["plain"]["locality"] + 0.15, scores
    assert scores["null-space"]["reliability"] >= 0.7, scores


@pytest.mark.slow
def test_soft_null_space_keeps_neighbour_facts_better_at_the_preset_location_on_smollm2(smollm2_capitals):
    """The smollm2-135m preset's location (layer 25 MLP), plain vs soft null space, same training."""
    cfg = EditConfig(layers=(25,), module="mlp", lr=1e-3, batch_size=8, epochs=40)
    soft = cfg.replace(null_space_tol=1e-2, null_space_mode="soft")
    scores = _teacher_forced_scores(smollm2_capitals, {name: _trained(smollm2_capitals, c)
                                                       for name, c in (("plain", cfg), ("soft", soft))})
    # measured 2026-11-23: teacher-forced locality 36.1% -> 58.3%, reliability 100% in both
    assert scores["soft"]["locality"] > scores["plain"]["locality"] + 0.10, scores
    assert scores["soft"]["reliability"] >= 0.95, scores


@pytest.mark.slow
def test_subject_scoped_null_space_keeps_the_known_neighbours_on_smollm2(smollm2_capitals, layer3_plain):
    """16 capital counterfactuals at layer 3, plain vs subject scope (50 other records' subjects kept)."""
    from pathlib import Path

    from locft_jax.data import load_requests
    from locft_jax.evaluate import evaluate_requests, snapshot
    from locft_jax.evaluate.update_action import action_metrics

    model, edits, _, _ = smollm2_capitals
    records = load_requests(Path(__file__).parents[1] / "experiments" / "data" / "country_capitals.json").requests
    neighbours = records[16:66]  # the scored locality prompts are of countries outside the records
    pre = snapshot(model.params, model.config, model.tokenizer, edits, ("generation",))
    subject = LAYER3.replace(null_space_tol=1e-3, null_space_scope="subject")
    scoped = edit(model, edits, subject, preserve_subjects=neighbours, mesh=ONE_DEVICE)
    runs = {"plain": layer3_plain, "subject": scoped}
    scores = {}
    for name, result in runs.items():
        post = evaluate_requests(result.params, model.config, model.tokenizer, edits, pre=pre,
                                 styles=("generation",)).post
        scores[name] = {k: post[f"generation/{k}"].value for k in ("reliability", "locality_retained")}
        actions = action_metrics(model.params, result.trainable, model.config, model.tokenizer, edits)
        scores[name]["action_ratio"] = (actions["update_action/locality_prompts"].value
                                        / actions["update_action/edit_prompts"].value)
    # measured 2026-11-30: known neighbours still right 66.7% (plain) -> 100%, reliability 100% in both;
    # update action on the locality prompts over that on the edit prompts 1.01 (plain) -> 0.31
    assert scores["subject"]["locality_retained"] >= scores["plain"]["locality_retained"] + 0.15, scores
    assert scores["subject"]["reliability"] >= 0.9, scores
    assert scores["plain"]["action_ratio"] > 0.8 and scores["subject"]["action_ratio"] < 0.5, scores


@pytest.mark.slow
def test_null_space_with_fact_prompts_meets_issue_3_on_unrelated_facts(smollm2_capitals):
    """Issue 3's bar on the real model with quality's +null-space recipe (50 edits, 141 neighbours, 80
    epochs at batch 16, lr 1.5e-3): ≥ 95% greedy reliability, and ≥ 90% of the known general facts
    still right and ≥ 90% teacher-forced agreement on them (EasyEdit's locality) — none of them
    preserved."""
    from pathlib import Path

    from experiments.cli_options import DEFAULT_FACTS
    from experiments.presets import edit_config
    from locft_jax.augment import preserve_texts, retain_requests
    from locft_jax.data import load_requests, load_texts
    from locft_jax.evaluate.generation_match import exact_match
    from locft_jax.evaluate.unrelated import fact_snapshot, load_facts, unrelated_metrics
    from locft_jax.generate import generate_greedy

    model = smollm2_capitals[0]
    data = Path(__file__).parents[1] / "experiments" / "data"
    records = load_requests(data / "country_capitals.json").requests
    edits, neighbours = records[:50], records[50:]
    preserve = load_texts(data / "preserve.txt")  # in quality's order: passages, fact prompts, neighbours
    for prompts in (load_texts(data / "preserve_facts.txt"), [r.prompt for r in neighbours]):
        preserve += preserve_texts(retain_requests(model.params, model.config, model.tokenizer, prompts))
    facts = load_facts(DEFAULT_FACTS)
    pre = fact_snapshot(model.params, model.config, model.tokenizer, facts)
    config = edit_config(model.config, epochs=80, batch_size=16, lr=1.5e-3, null_space_tol=1e-3)
    result = edit(model, edits, config, preserve=preserve, mesh=ONE_DEVICE)
    answers = generate_greedy(result.params, model.config, model.tokenizer, [r.prompt for r in edits])
    reliability = sum(exact_match(a, r.target_new) for a, r in zip(answers, edits, strict=True)) / len(edits)
    unrelated = unrelated_metrics(pre, fact_snapshot(result.params, model.config, model.tokenizer, facts))
    scores = {"reliability": reliability, **{k: m.value for k, m in unrelated.items()}}
    # measured 2026-11-30 (quality, same recipe, seeds 0-2): reliability 100%, still right 93.2-95.5%,
    # TF 91.0-92.9%
    assert reliability >= 0.95, scores
    assert scores["unrelated/still_right"] >= 0.9 and scores["unrelated/teacher_forced"] >= 0.9, scores
