"""Scoring edit requests: reliability, generalization, portability, locality and fluency.

Two steps. ``snapshot`` runs one model over every probe of the requests (a probe is one prompt
with its reference answer) and keeps what it produced: teacher-forced argmax tokens and accuracy,
greedy answers, fluency texts. ``evaluate_requests`` turns a post-edit snapshot, and optionally a
pre-edit one, into metrics. The pre-edit snapshot is computed once and reused for every edited
model (save/load it as JSON); locality compares the two.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from locft_jax import generate
from locft_jax.config import ModelConfig
from locft_jax.evaluate import fluency, teacher_forced
from locft_jax.evaluate.generation_match import exact_match, normalize_answer
from locft_jax.evaluate.metrics import Metric, mean_of_means, pooled
from locft_jax.files import write_text_atomic
from locft_jax.model import Params
from locft_jax.requests import EditRequest

STYLES = ("teacher_forced", "generation", "fluency")
KINDS = ("reliability", "generalization", "portability", "locality")
# New tokens of greedy continuation for the n-gram entropy (EasyEdit's greedy path: 100 new
# tokens; ROME and EasyEdit's default sample top-5 up to 100 tokens including the prompt).
FLUENCY_TOKENS = 100


class Probe(NamedTuple):
    request: int
    kind: str  # one of KINDS
    prompt: str
    answer: str  # the reference: target_new, a portability answer or a locality answer


def probes_of(requests: Sequence[EditRequest]) -> list[Probe]:
    """Every (prompt, answer) the requests support, in request order."""
    out = []
    for i, r in enumerate(requests):
        r.validate(i)
        out.append(Probe(i, "reliability", r.prompt, r.target_new))
        out += [Probe(i, "generalization", p, r.target_new) for p in r.rephrase_prompts]
        for kind in ("portability", "locality"):
            pairs = zip(getattr(r, f"{kind}_prompts"), getattr(r, f"{kind}_answers"), strict=True)
            out += [Probe(i, kind, p, a) for p, a in pairs]
    return out


@dataclasses.dataclass
class Snapshot:
    """What one model produced on the requests' probes (``None`` for styles not run)."""

    probes: list[Probe]
    settings: dict[str, Any]
    predicted: list[list[int]] | None = None  # teacher-forced argmax at each answer token
    token_accuracy: list[float] | None = None
    answers: list[str] | None = None  # greedy answers, cut at the stop strings
    fluency_texts: list[str] | None = None  # per request: prompt + greedy continuation

    def save(self, path: str | Path) -> None:
        data = dataclasses.asdict(self)
        data["probes"] = [list(p) for p in self.probes]
        write_text_atomic(path, json.dumps(data))

    @classmethod
    def load(cls, path: str | Path) -> Snapshot:
        data = json.loads(Path(path).read_text())
        data["probes"] = [Probe(*p) for p in data["probes"]]
        return cls(**data)

    def check_matches(self, probes: list[Probe], settings: dict[str, Any]) -> None:
        """Raise ``ValueError`` unless this snapshot scored ``probes`` with ``settings``."""
        if self.probes != probes:
            raise ValueError("pre-edit snapshot was taken on different requests (probes differ)")
        if self.settings != settings:
            raise ValueError(f"pre-edit snapshot settings {self.settings} differ from {settings}")


PreEditSnapshot = Snapshot  # the pre-edit model's snapshot: taken once, reused for every edit


def snapshot_settings(styles: Sequence[str], max_new_tokens: int, stop_at: Sequence[str]) -> dict[str, Any]:
    """What a snapshot's outputs depend on besides the model (two compared snapshots must agree)."""
    unknown = set(styles) - set(STYLES)
    if unknown:
        raise ValueError(f"unknown styles {sorted(unknown)}; choose from {STYLES}")
    return {"styles": sorted(styles), "max_new_tokens": max_new_tokens, "stop_at": list(stop_at)}


def snapshot(
    params: Params,
    config: ModelConfig,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    styles: Sequence[str] = STYLES,
    max_new_tokens: int = 32,
    stop_at: Sequence[str] = generate.DEFAULT_STOP_AT,
    batch_size: int = generate.DEFAULT_BATCH_SIZE,
) -> Snapshot:
    """Run the model over every probe of the requests once per requested style."""
    snap = score_probes(params, config, tokenizer, probes_of(requests), styles, max_new_tokens, stop_at, batch_size)
    if "fluency" in styles:
        edit_prompts = [r.prompt for r in requests]
        gen = generate.generate_greedy(
            params, config, tokenizer, edit_prompts, FLUENCY_TOKENS, batch_size, stop_at=()
        )
        snap.fluency_texts = [p + g for p, g in zip(edit_prompts, gen, strict=True)]
    return snap


def score_probes(
    params: Params,
    config: ModelConfig,
    tokenizer: Any,
    probes: Sequence[Probe],
    styles: Sequence[str] = ("teacher_forced", "generation"),
    max_new_tokens: int = 32,
    stop_at: Sequence[str] = generate.DEFAULT_STOP_AT,
    batch_size: int = generate.DEFAULT_BATCH_SIZE,
) -> Snapshot:
    """Teacher-forced argmax tokens and accuracy, and greedy answers, on ``probes`` (fluency,
    which belongs to requests, is ``snapshot``'s)."""
    snap = Snapshot(list(probes), snapshot_settings(styles, max_new_tokens, stop_at))
    prompts, answers = [p.prompt for p in probes], [p.answer for p in probes]
    if "teacher_forced" in styles:
        scores = teacher_forced.score_targets(params, config, tokenizer, prompts, answers, batch_size)
        snap.predicted = [s.predicted.tolist() for s in scores]
        snap.token_accuracy = [s.accuracy for s in scores]
    if "generation" in styles:
        unique = list(dict.fromkeys(prompts))
        gen = generate.generate_greedy(params, config, tokenizer, unique, max_new_tokens, batch_size, stop_at)
        by_prompt = dict(zip(unique, gen, strict=True))
        snap.answers = [by_prompt[p] for p in prompts]
    return snap


def probe_scores(post: Snapshot, pre: Snapshot | None, i: int) -> dict[str, float]:
    """Every score of probe ``i`` (those needing a pre-edit snapshot only when there is one)."""
    probe, out = post.probes[i], {}
    locality = probe.kind == "locality"
    if post.predicted is not None:
        if not locality:
            out["teacher_forced"] = post.token_accuracy[i]
        elif pre is not None and pre.predicted is not None:
            out["teacher_forced"] = float(np.mean(np.equal(post.predicted[i], pre.predicted[i])))
    if post.answers is not None:
        hit = float(exact_match(post.answers[i], probe.answer))
        if not locality:
            out["generation"] = hit
        else:
            out["generation_vs_answer"] = hit
            if pre is not None and pre.answers is not None:
                out["generation"] = float(exact_match(post.answers[i], pre.answers[i]))
                if exact_match(pre.answers[i], probe.answer):
                    out["generation_retained"] = hit
    return out


_AGGREGATES = {  # metric name → (probe kind, probe score key)
    **{f"teacher_forced/{k}": (k, "teacher_forced") for k in KINDS},
    **{f"generation/{k}": (k, "generation") for k in KINDS},
    "generation/locality_vs_answer": ("locality", "generation_vs_answer"),
}


def _metrics(post: Snapshot, pre: Snapshot | None, n_requests: int) -> tuple[dict[str, Metric], list[dict]]:
    """Aggregate metrics and per-request rows (probe details and per-request metric values)."""
    rows: list[dict] = [{"metrics": {}, "probes": []} for _ in range(n_requests)]
    groups: dict[str, list[list[float]]] = {name: [[] for _ in range(n_requests)] for name in _AGGREGATES}
    retained: list[float] = []
    spilled: list[float] = []
    new_targets = {normalize_answer(p.answer) for p in post.probes if p.kind == "reliability"}
    compare = post.answers is not None and pre is not None and pre.answers is not None
    for i, probe in enumerate(post.probes):
        scores = probe_scores(post, pre, i)
        detail = {"kind": probe.kind, "prompt": probe.prompt, "answer": probe.answer}
        if post.answers is not None:
            detail["post_answer"] = post.answers[i]
            if pre is not None and pre.answers is not None:
                detail["pre_answer"] = pre.answers[i]
        rows[probe.request]["probes"].append({**detail, **scores})
        for name, (kind, key) in _AGGREGATES.items():
            if kind == probe.kind and key in scores:
                groups[name][probe.request].append(scores[key])
        if "generation_retained" in scores:
            retained.append(scores["generation_retained"])
        if compare and probe.kind == "locality":
            spilled.append(float(normalize_answer(post.answers[i]) in new_targets
                                 and normalize_answer(pre.answers[i]) not in new_targets))
    metrics = {name: mean_of_means(g) for name, g in groups.items() if any(g)}
    for name, g in groups.items():
        for r, values in enumerate(g):
            if values:
                rows[r]["metrics"][name] = float(np.mean(values))
    if compare:
        metrics["generation/locality_retained"] = pooled(retained)
        metrics["generation/locality_spill"] = pooled(spilled)
    if post.fluency_texts is not None:
        entropies = [fluency.n_gram_entropy_of(t) for t in post.fluency_texts]
        metrics["fluency/ngram_entropy"] = Metric(float(np.mean(entropies)), len(entropies), len(entropies))
        for row, text, e in zip(rows, post.fluency_texts, entropies, strict=True):
            row["fluency_text"] = text
            row["metrics"]["fluency/ngram_entropy"] = e
    return metrics, rows


@dataclasses.dataclass
class EvalResult:
    """Aggregate metrics after (and before, when given) the edit, and one row per request."""

    post: dict[str, Metric]
    pre: dict[str, Metric] | None
    per_request: list[dict]
    settings: dict[str, Any]

    def add_metrics(self, post: dict[str, Metric], pre: dict[str, Metric] | None = None) -> None:
        """Merge metrics computed elsewhere (e.g. ``capability``) into the report."""
        self.post.update(post)
        if pre is not None:
            self.pre = {**(self.pre or {}), **pre}


def evaluate_requests(
    params: Params,
    config: ModelConfig,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    pre: Params | Snapshot | None = None,
    styles: Sequence[str] = STYLES,
    max_new_tokens: int = 32,
    stop_at: Sequence[str] = generate.DEFAULT_STOP_AT,
    batch_size: int = generate.DEFAULT_BATCH_SIZE,
) -> EvalResult:
    """Score the edited ``params`` on ``requests``; ``pre``: pre-edit params or their snapshot.

    Locality against the pre-edit model (teacher-forced argmax agreement, generation match) needs
    ``pre``; everything else does not. Pre-edit metrics are the pre snapshot scored against itself.
    """
    settings = dict(styles=styles, max_new_tokens=max_new_tokens, stop_at=stop_at, batch_size=batch_size)
    if isinstance(pre, Snapshot):  # fail before any model work
        pre.check_matches(probes_of(requests), snapshot_settings(styles, max_new_tokens, stop_at))
    elif pre is not None:
        pre = snapshot(pre, config, tokenizer, requests, **settings)
    post = snapshot(params, config, tokenizer, requests, **settings)
    post_metrics, rows = _metrics(post, pre, len(requests))
    pre_metrics = None
    if pre is not None:
        pre_metrics, pre_rows = _metrics(pre, pre, len(requests))
        for row, pre_row in zip(rows, pre_rows, strict=True):
            row["pre_metrics"] = pre_row["metrics"]
    for i, (row, r) in enumerate(zip(rows, requests, strict=True)):
        head = {"index": i, "prompt": r.prompt, "target_new": r.target_new, "ground_truth": r.ground_truth}
        rows[i] = {**head, **row}
    return EvalResult(post_metrics, pre_metrics, rows, post.settings)
