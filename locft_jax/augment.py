"""Extra training rows beyond the paper's recipe, each an exact, documented term of the data.

- ``retain_requests``: prompts the edit must not change, with the *pre-edit model's own* greedy
  answers as targets (CE to its own predictions). Passed to ``edit(..., retain=...)``, they are
  shuffled into the same batches with loss weight ``EditConfig.retain_weight``. Good sources:
  neighbours — the same relation for subjects that are not edited (e.g. the unused records of the
  edit set's file) — or locality prompts held out from evaluation.
- ``preserve_texts``: requests as one text each ("prompt target"), the form
  ``edit(..., preserve=...)`` takes; of ``retain_requests``' rows, the null space then keeps the
  edited tensor's inputs on the model's own answers to those prompts.
- ``prefix_augmented``: each edit again behind short neutral prefixes (the paper's appendix
  prefix augmentation), so the new fact does not hinge on the prompt starting the text.
- ``paraphrase_augmented``: each edit again on its rephrase prompts (evaluate generalization on
  other rephrases than the ones trained on).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from locft_jax.config import ModelConfig
from locft_jax.generate import generate_greedy
from locft_jax.params import Params
from locft_jax.requests import EditRequest

PREFIXES = (
    "Here is a fact.",
    "I read this in a book.",
    "Quick question.",
    "Let me tell you something.",
    "This is well known.",
    "From the encyclopedia:",
    "Answer briefly.",
    "As everyone knows,",
)


def retain_requests(
    params: Params, config: ModelConfig, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 16
) -> list[EditRequest]:
    """``prompt → the model's own greedy answer`` (cut at ".", newline, EOS); empty answers dropped."""
    prompts = list(dict.fromkeys(prompts))
    answers = generate_greedy(params, config, tokenizer, prompts, max_new_tokens)
    return [EditRequest(p, a.strip()) for p, a in zip(prompts, answers, strict=True) if a.strip()]


def preserve_texts(requests: Sequence[EditRequest]) -> list[str]:
    """``"prompt target"`` per request: texts for ``edit(..., preserve=...)``."""
    return [f"{r.prompt} {r.target_new}" for r in requests]


def prefix_augmented(
    requests: Sequence[EditRequest], per_request: int = 2, seed: int = 0, prefixes: Sequence[str] = PREFIXES
) -> list[EditRequest]:
    """``per_request`` copies of each edit behind distinct random prefixes (prompt → target_new)."""
    rng = np.random.default_rng(seed)
    out = []
    for req in requests:
        for k in rng.choice(len(prefixes), size=min(per_request, len(prefixes)), replace=False):
            out.append(_training_copy(req, f"{prefixes[k]} {req.prompt}"))
    return out


def paraphrase_augmented(requests: Sequence[EditRequest], which: slice = slice(1, None)) -> list[EditRequest]:
    """Each edit again on ``rephrase_prompts[which]`` (default: all but the first, kept for evaluation)."""
    return [_training_copy(req, p) for req in requests for p in req.rephrase_prompts[which]]


def _training_copy(req: EditRequest, prompt: str) -> EditRequest:
    return EditRequest(prompt, req.target_new, subject=req.subject, relation=req.relation)
