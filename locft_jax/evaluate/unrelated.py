"""Locality on general facts: what the edit does to knowledge of other relations.

The paper's locality is "unrelated prompts keep their pre-edit answer". An edit set's own
locality prompts are often about neighbours (the same relation, other subjects: CounterFact's
neighbourhood); this scores a separate list of general facts (``experiments/data/general_facts.json``:
science, books, people, places; a few name a country in another relation, e.g. its currency,
which an edit of that country's capital must leave alone too), each a prompt and its true
answer. Three numbers, post-edit against the pre-edit model's snapshot of the same facts:

* ``unrelated/generation``: the greedy answer (≤ 32 tokens, cut at "." / newline / EOS) equals the
  pre-edit one after normalisation (the paper's scoring; strict: the whole continuation counts);
* ``unrelated/teacher_forced``: the share of answer tokens whose teacher-forced argmax is unchanged
  (EasyEdit's locality);
* ``unrelated/still_right``: of the facts whose pre-edit answer began with the true answer, the
  share whose post-edit answer still does.

``fact_answers`` lists every fact's answers before and after, to see which ones moved.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from locft_jax.config import ModelConfig
from locft_jax.data.fields import FieldError, required_text
from locft_jax.evaluate.edits import Probe, Snapshot, probe_scores, score_probes
from locft_jax.evaluate.generation_match import starts_with_answer
from locft_jax.evaluate.metrics import Metric, pooled
from locft_jax.model import Params


@dataclasses.dataclass(frozen=True)
class Fact:
    prompt: str
    answer: str


def load_facts(path: str | os.PathLike[str]) -> list[Fact]:
    """A JSON list of ``{"prompt": ..., "answer": ...}``; errors name the file, record and field."""
    if Path(path).is_dir():
        raise ValueError(f"{path}: is a directory; expected a JSON file of {{'prompt', 'answer'}} records")
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty JSON list of {{'prompt', 'answer'}} records")
    facts = []
    for i, record in enumerate(records):
        try:
            if not isinstance(record, dict):
                raise FieldError(f"expected an object, got {type(record).__name__}")
            facts.append(Fact(required_text(record, "prompt"), required_text(record, "answer")))
        except FieldError as e:
            raise ValueError(f"{path}: record {i}: {e}") from None
    return facts


def fact_snapshot(params: Params, config: ModelConfig, tokenizer: Any, facts: Sequence[Fact]) -> Snapshot:
    """Teacher-forced argmax on each fact's answer and the greedy answer, for one model."""
    probes = [Probe(i, "locality", f.prompt, f.answer) for i, f in enumerate(facts)]
    return score_probes(params, config, tokenizer, probes)


def unrelated_metrics(pre: Snapshot, post: Snapshot) -> dict[str, Metric]:
    """``unrelated/{generation,teacher_forced,still_right}`` of ``post`` against ``pre`` (module doc)."""
    _check_same_facts(pre, post)
    # the pre/post agreement of each probe, by the rules of the edit sets' own locality probes
    scores = [probe_scores(post, pre, i) for i in range(len(post.probes))]
    answers = [p.answer for p in post.probes]
    known = [i for i, a in enumerate(answers) if starts_with_answer(pre.answers[i], a)]
    return {
        "unrelated/generation": pooled([s["generation"] for s in scores]),
        "unrelated/teacher_forced": pooled([s["teacher_forced"] for s in scores]),
        "unrelated/still_right": pooled([float(starts_with_answer(post.answers[i], answers[i])) for i in known]),
    }


def fact_answers(pre: Snapshot, post: Snapshot) -> list[dict[str, Any]]:
    """Per fact: prompt, true answer, the pre- and post-edit greedy answers, and whether each begins
    with the true answer."""
    _check_same_facts(pre, post)
    return [
        {"prompt": probe.prompt, "answer": probe.answer, "pre_answer": pre.answers[i], "post_answer": post.answers[i],
         "right_before": starts_with_answer(pre.answers[i], probe.answer),
         "right_after": starts_with_answer(post.answers[i], probe.answer)}
        for i, probe in enumerate(post.probes)
    ]


def _check_same_facts(pre: Snapshot, post: Snapshot) -> None:
    if pre.probes != post.probes or pre.settings != post.settings:
        raise ValueError("pre- and post-edit fact snapshots differ in facts or settings")
