"""Locality on general facts (``locft_jax.evaluate.unrelated``): loading, matching, metrics."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments.cli_options import DEFAULT_FACTS
from locft_jax import load_model
from locft_jax.data import load_texts
from locft_jax.evaluate.edits import Probe, Snapshot, snapshot_settings
from locft_jax.evaluate.generation_match import starts_with_answer
from locft_jax.evaluate.metrics import Metric
from locft_jax.evaluate.unrelated import fact_answers, fact_snapshot, load_facts, unrelated_metrics
from locft_jax.generate import generate_greedy


def test_the_shipped_general_facts_load_and_are_distinct():
    facts = load_facts(DEFAULT_FACTS)
    assert len(facts) >= 80
    assert len({f.prompt for f in facts}) == len(facts)
    assert all(f.prompt and f.answer and not f.prompt.endswith(" ") for f in facts)


def test_shipped_preserve_facts_leave_the_scored_facts_out():
    """quality's +null-space keeps data/preserve_facts.txt: none of it may be a scored fact or name its answer."""
    facts = load_facts(DEFAULT_FACTS)
    prompts = load_texts(Path(DEFAULT_FACTS).parent / "preserve_facts.txt")
    assert len(prompts) >= 100 and len(set(prompts)) == len(prompts)
    assert not {f.prompt for f in facts} & set(prompts)
    for fact in facts:
        if len(fact.answer) >= 4:  # "O", "100", "Fe" would match by chance
            named = [p for p in prompts if re.search(rf"\b{re.escape(fact.answer)}\b", p, re.IGNORECASE)]
            assert not named, (fact, named)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"prompt": "a", "answer": "b"}, {"prompt": "c"}]', "record 1: missing field 'answer'"),
        ('[{"prompt": "a", "answer": "  "}]', "record 0: field 'answer' is empty"),
        ('[{"prompt": 3, "answer": "b"}]', "record 0: field 'prompt': expected a string"),
        ('["just text"]', "record 0: expected an object"),
        ("[]", "non-empty JSON list"),
        ('{"prompt": "a"}', "non-empty JSON list"),
        ('[{"prompt": "a", "answer": "b"}', "not valid JSON"),
    ],
)
def test_bad_fact_files_name_the_record_and_field(tmp_path, content, message):
    path = tmp_path / "facts.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        load_facts(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("prediction", "reference", "want"),
    [
        (" Jupiter, but it's not the only one", "Jupiter", True),
        (" the Pacific Ocean", "Pacific Ocean", True),
        (" Au", "Au", True),
        (" Jupiterian moons", "Jupiter", False),
        (" named Neil Armstrong", "Neil Armstrong", False),
        ("", "x", False),
        (" anything", "", False),
    ],
)
def test_starts_with_answer_needs_the_whole_answer_first(prediction, reference, want):
    assert starts_with_answer(prediction, reference) is want


def _snapshot(answers, predicted, facts):
    probes = [Probe(i, "locality", p, a) for i, (p, a) in enumerate(facts)]
    settings = snapshot_settings(("teacher_forced", "generation"), 32, (".", "\n"))
    return Snapshot(probes, settings, predicted=predicted, answers=answers)


def test_unrelated_metrics_on_hand_made_snapshots():
    facts = [("p0", "Au"), ("p1", "Jupiter"), ("p2", "Homer"), ("p3", "cold")]
    pre = _snapshot([" Au", " Jupiter, the largest", " a poet", " cold"], [[1], [2, 3], [4, 5], [6]], facts)
    post = _snapshot([" Au", " Jupiter, the biggest", " Homer", " hot"], [[1], [2, 9], [4, 5], [7]], facts)
    got = unrelated_metrics(pre, post)
    # Same greedy answer: p0 only. Same argmax tokens: 1, 1/2, 1, 0. Known before: p0, p1, p3; still: p0, p1.
    assert got["unrelated/generation"] == Metric(0.25, 4, 4)
    assert got["unrelated/teacher_forced"] == Metric(0.625, 4, 4)
    assert got["unrelated/still_right"].value == pytest.approx(2 / 3) and got["unrelated/still_right"].count == 3
    own = unrelated_metrics(pre, pre)
    assert {k: m.value for k, m in own.items()} == {k: 1.0 for k in own}
    fewer = _snapshot(post.answers[:3], post.predicted[:3], facts[:3])
    with pytest.raises(ValueError, match="differ"):
        unrelated_metrics(pre, fewer)
    with pytest.raises(ValueError, match="differ"):
        fact_answers(pre, fewer)


def test_fact_locality_of_a_changed_model_matches_its_greedy_answers(tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    facts = load_facts(DEFAULT_FACTS)[:8]
    layer = model.params["model"]["layers"][1]["mlp"]["down_proj"]
    changed = jax.tree.map(lambda x: x, model.params)
    changed["model"]["layers"][1]["mlp"]["down_proj"] = jax.tree.map(lambda w: w * 40.0, layer)
    pre = fact_snapshot(model.params, model.config, model.tokenizer, facts)
    post = fact_snapshot(changed, model.config, model.tokenizer, facts)
    got = unrelated_metrics(pre, post)
    prompts = [f.prompt for f in facts]
    before = generate_greedy(model.params, model.config, model.tokenizer, prompts)
    after = generate_greedy(changed, model.config, model.tokenizer, prompts)
    assert pre.answers == before and post.answers == after
    same = np.mean([a == b for a, b in zip(before, after, strict=True)])
    assert got["unrelated/generation"] == Metric(pytest.approx(same), 8, 8)
    assert got["unrelated/generation"].value < 1.0, "a 40x down_proj should change some greedy answer"
    assert got["unrelated/teacher_forced"].count == 8
