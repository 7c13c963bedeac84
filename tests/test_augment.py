"""Data augmentation rows: prefixes and paraphrases."""

from __future__ import annotations

from locft_jax.augment import PREFIXES, paraphrase_augmented, prefix_augmented
from locft_jax.requests import EditRequest

REQ = EditRequest("The capital of France is", "Rome", subject="France",
                  rephrase_prompts=("France's capital is", "The capital city of France is"))


def test_prefix_augmentation_prepends_distinct_known_prefixes_deterministically():
    out = prefix_augmented([REQ], per_request=3, seed=1)
    assert len(out) == 3 and len({r.prompt for r in out}) == 3
    for r in out:
        prefix = r.prompt[: -len(REQ.prompt) - 1]
        assert prefix in PREFIXES and r.prompt.endswith(" " + REQ.prompt) and r.target_new == "Rome"
    assert out == prefix_augmented([REQ], per_request=3, seed=1)


def test_paraphrase_training_rows_leave_the_first_rephrase_for_evaluation():
    train = paraphrase_augmented([REQ])
    assert [r.prompt for r in train] == ["The capital city of France is"]
    assert train[0].target_new == "Rome" and train[0].subject == "France"
