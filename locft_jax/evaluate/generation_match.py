"""The paper's generation metric: SQuAD-style answer normalisation and exact match.

A generated answer (greedy, cut at ".", newline or EOS by ``generate.generate_greedy``) is right
when, after lower-casing, removing punctuation, removing the articles a/an/the and collapsing
whitespace, it equals the equally normalised target.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop articles, collapse whitespace (SQuAD's order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str | Sequence[str]) -> bool:
    """Whether the normalised prediction equals the (any of the) normalised reference(s)."""
    refs = [reference] if isinstance(reference, str) else list(reference)
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(r) for r in refs)


def starts_with_answer(prediction: str, reference: str) -> bool:
    """Whether the normalised prediction begins with the normalised reference as whole words
    ("Jupiter, the largest" starts with "Jupiter"; "Jupiterian" does not)."""
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    return bool(ref) and (pred == ref or pred.startswith(ref + " "))
