"""A metric value with its counts, the aggregation rule, and what each metric name means."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class Metric(NamedTuple):
    """``value`` (None when nothing was scored), ``count`` of the averaged units, ``prompts`` scored."""

    value: float | None
    count: int
    prompts: int

    def to_json(self) -> dict:
        return {"value": self.value, "count": self.count, "prompts": self.prompts}


def mean_of_means(groups: Sequence[Sequence[float]]) -> Metric:
    """EasyEdit's aggregation: mean within each request, then mean over requests that have any."""
    means = [float(np.mean(g)) for g in groups if len(g)]
    return Metric(float(np.mean(means)) if means else None, len(means), sum(len(g) for g in groups))


def pooled(values: Sequence[float]) -> Metric:
    """A plain mean over all scored prompts (for conditional metrics, undefined for many requests)."""
    return Metric(float(np.mean(values)) if len(values) else None, len(values), len(values))


# Metrics that are a quantity, not a share of prompts or tokens: reports print them as numbers.
QUANTITIES = ("update_action/", "fluency/", "capability/perplexity")


def is_share(name: str) -> bool:
    """Whether metric ``name`` is a share in [0, 1] (shown as a percentage) rather than a quantity."""
    return not name.startswith(QUANTITIES)


# Shown next to each metric in reports: the teacher-forced and generation numbers differ a lot.
LABELS = {
    "update_action/edit_prompts": "where the edit acts: largest per-token ‖ΔW k‖/‖W₀ k‖ on an edit prompt, mean",
    "update_action/locality_prompts": "the same on a locality prompt: ~0 when the edit leaves it alone",
    "teacher_forced/reliability": "EasyEdit teacher-forced token accuracy of target_new on the edit prompt",
    "teacher_forced/generalization": "EasyEdit teacher-forced token accuracy of target_new on rephrases",
    "teacher_forced/portability": "EasyEdit teacher-forced token accuracy of portability answers",
    "teacher_forced/locality": "EasyEdit locality: share of locality-answer tokens whose argmax is unchanged",
    "generation/reliability": "paper: greedy answer (stop at . / newline / EOS) exact-matches target_new",
    "generation/generalization": "paper: greedy answer on rephrases exact-matches target_new",
    "generation/portability": "paper: greedy answer exact-matches the portability answer",
    "generation/locality": "paper: greedy answer on locality prompts exact-matches the pre-edit answer",
    "generation/locality_vs_answer": "greedy answer on locality prompts exact-matches the locality answer",
    "generation/locality_retained": "of locality prompts answered right before the edit, share still right",
    "generation/locality_spill": "locality prompts whose greedy answer became some edit's target_new (not so before)",
    "unrelated/generation": "paper: greedy answer on a general fact (another relation) exact-matches the pre-edit one",
    "unrelated/teacher_forced": "EasyEdit: share of a general fact's answer tokens whose argmax is unchanged",
    "unrelated/still_right": "of general facts answered right before the edit (answer first), share still right",
    "fluency/ngram_entropy": "ROME/EasyEdit weighted 2/3-gram entropy of prompt + greedy continuation",
    "capability/multiple_choice_accuracy": "MMLU-format: highest log-likelihood choice is the answer",
    "capability/gsm8k_exact_match": "GSM8K-format: last number of the greedy answer equals #### N",
    "capability/qa_exact_match": "NQ-format: greedy answer exact-matches one of the answers",
    "capability/perplexity": "perplexity of a text in fixed-length sliding windows (count = tokens)",
}
