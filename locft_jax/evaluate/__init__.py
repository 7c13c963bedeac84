"""Scoring edits the way the field does: EasyEdit's teacher-forced token accuracy and the paper's
greedy-generation exact match, plus locality (neighbours, and general facts: ``unrelated``),
fluency and general capability, and where an edit acts (``update_action``)."""

from locft_jax.evaluate.capability import evaluate_capability
from locft_jax.evaluate.edits import (
    STYLES,
    EvalResult,
    PreEditSnapshot,
    Snapshot,
    evaluate_requests,
    probes_of,
    snapshot,
)
from locft_jax.evaluate.fluency import n_gram_entropy
from locft_jax.evaluate.generation_match import exact_match, normalize_answer
from locft_jax.evaluate.metrics import Metric
from locft_jax.evaluate.report import markdown_table, write_jsonl, write_report
from locft_jax.evaluate.teacher_forced import score_targets, token_accuracy
from locft_jax.evaluate.unrelated import Fact, fact_answers, fact_snapshot, load_facts, unrelated_metrics
from locft_jax.evaluate.update_action import TokenAction, update_action

__all__ = [
    "STYLES",
    "EvalResult",
    "Fact",
    "Metric",
    "PreEditSnapshot",
    "Snapshot",
    "TokenAction",
    "evaluate_capability",
    "evaluate_requests",
    "exact_match",
    "fact_answers",
    "fact_snapshot",
    "load_facts",
    "markdown_table",
    "n_gram_entropy",
    "normalize_answer",
    "probes_of",
    "score_targets",
    "snapshot",
    "token_accuracy",
    "unrelated_metrics",
    "update_action",
    "write_jsonl",
    "write_report",
]
