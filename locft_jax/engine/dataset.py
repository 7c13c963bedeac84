"""Edit requests → token arrays, tokenized once, plus the per-epoch batch order.

All requests are stored right-padded in ``[N, T]`` / ``[N, U]`` arrays; a step receives only the
row indices of its batch and gathers on device. Each batch is cut to the length bucket of its
longest row, so the jitted step compiles once per bucket pair, never per batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from locft_jax.requests import EditRequest, RequestError
from locft_jax.tokens import DEFAULT_BUCKETS, PromptTarget, bucket, encode_pair, pad_target_batch

TARGET_BUCKETS = (4, 8, 16, 32, 64, 128, 256)


@dataclasses.dataclass
class EditDataset:
    """Tokenized requests. ``kept[i]`` is the index in the caller's list of row ``i``."""

    ids: np.ndarray  # [N, T] int32, right-padded
    mask: np.ndarray  # [N, T] bool
    target_pos: np.ndarray  # [N, U] int32: position whose logits predict target_ids
    target_ids: np.ndarray  # [N, U] int32
    target_mask: np.ndarray  # [N, U] bool
    seq_len: np.ndarray  # [N]: tokens that run (prompt + target, less what no loss term reads)
    tgt_len: np.ndarray  # [N]
    weight: np.ndarray  # [N] float32: 1 for edits, ``retain_weight`` for retain rows
    loss_offset: np.ndarray  # [N] float32: added to a row's loss (0; KL retain rows: see ``retain_kl``)
    kept: list[int]  # edits first, then retain rows (indices into their own lists)
    skipped: list[tuple[int, str]]  # (record index, reason) of edit requests skipped (``on_bad_record="skip"``)
    n_edits: int  # rows 0..n_edits-1 are edits, the rest retain rows
    skipped_retain: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # the same for retain records

    def __len__(self) -> int:
        return len(self.seq_len)

    def shape_of(self, rows: np.ndarray) -> tuple[int, int]:
        """(sequence bucket, target bucket) for a batch of rows."""
        return bucket(int(self.seq_len[rows].max())), bucket(int(self.tgt_len[rows].max()), TARGET_BUCKETS)


def prepare_dataset(
    tokenizer: Any,
    requests: Sequence[EditRequest],
    objective: str = "ft-m",
    max_length: int = 256,
    on_bad_record: str = "error",
    retain: Sequence[EditRequest] = (),
    retain_weight: float = 1.0,
) -> EditDataset:
    """Validate and tokenize every request; bad ones raise or are skipped (``on_bad_record``).

    ``retain`` rows (prompt → the pre-edit model's own answer) train to keep what the model knew:
    their target has no EOS (the pre-edit model went on after its answer) and their loss is
    weighted by ``retain_weight``.
    """
    pairs: list[PromptTarget] = []
    kept: list[int] = []
    weights: list[float] = []
    n_edits = 0
    skipped: list[tuple[int, str]] = []
    skipped_retain: list[tuple[int, str]] = []
    groups = (("record", requests, True, 1.0), ("retain record", retain, False, retain_weight))
    edited_prompts = {req.prompt: i for i, req in enumerate(requests)}
    for kind, group, add_eos, weight in groups:
        seen: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
        for i, req in enumerate(group):
            try:
                pair = _encode_request(tokenizer, req, i, max_length, add_eos, kind)
                # the tokens, not the strings: "Paris" and " Paris" are the same training row
                key = (tuple(pair.prompt_ids), tuple(pair.target_ids))
                if key in seen:
                    raise RequestError(
                        f"{kind} {i}: duplicate of {kind} {seen[key]} (same prompt and target_new tokens)"
                    )
                if group is retain and req.prompt in edited_prompts:
                    raise RequestError(f"{kind} {i}: prompt {req.prompt!r} is also edited (record "
                                       f"{edited_prompts[req.prompt]}); a retain row would undo the edit")
                seen[key] = i
            except RequestError as err:
                if on_bad_record == "error":
                    raise
                (skipped if kind == "record" else skipped_retain).append((i, str(err)))
                continue
            pairs.append(pair)
            kept.append(i)
            weights.append(weight)
        if not pairs:
            raise RequestError(f"no usable edit requests ({len(skipped)} skipped)")
        n_edits = n_edits if kind != "record" else len(pairs)
    return _pack(pairs, kept, np.asarray(weights, np.float32), skipped, objective, n_edits, skipped_retain)


def _encode_request(
    tokenizer: Any, req: EditRequest, index: int, max_length: int, add_eos: bool = True, kind: str = "record"
) -> PromptTarget:
    try:
        req.validate(index)
    except RequestError as err:
        raise RequestError(str(err).replace("record", kind, 1)) from None
    prompt, target = encode_pair(tokenizer, req.prompt, req.target_new, add_eos)
    if not prompt:
        raise RequestError(f"{kind} {index}: prompt {req.prompt!r} tokenizes to nothing")
    if len(target) < 1 + int(add_eos):
        raise RequestError(f"{kind} {index}: target_new {req.target_new!r} tokenizes to nothing")
    if len(prompt) + len(target) > max_length:
        raise RequestError(
            f"{kind} {index}: prompt + target is {len(prompt) + len(target)} tokens, max_length is {max_length}"
        )
    return PromptTarget(prompt, target)


def _pack(
    pairs: list[PromptTarget],
    kept: list[int],
    weight: np.ndarray,
    skipped: list[tuple[int, str]],
    objective: str,
    n_edits: int,
    skipped_retain: list[tuple[int, str]],
) -> EditDataset:
    full_len = np.array([len(p) + len(t) for p, t in pairs])
    tgt_len = np.array([len(t) for _, t in pairs])
    u_all = bucket(int(tgt_len.max()), TARGET_BUCKETS)
    ids, mask, tpos, tids, tmask = pad_target_batch(pairs, bucket(int(full_len.max()), DEFAULT_BUCKETS), u_all)
    if objective == "ft-l":
        # EasyEdit's prompt_last: every target token scored at the last prompt position.
        prompt_last = np.array([len(p) - 1 for p, _ in pairs], np.int32)[:, None]
        tpos = np.where(tmask, prompt_last, 0).astype(np.int32)
    # Only tokens up to the last position the loss reads need to run: under causal attention a later
    # token (the final EOS, which predicts nothing; with ft-l the whole target) changes nothing.
    seq_len = np.where(tmask, tpos, 0).max(axis=1) + 1
    t_all = bucket(int(seq_len.max()), DEFAULT_BUCKETS)
    mask = mask[:, :t_all] & (np.arange(t_all)[None, :] < seq_len[:, None])
    ids = np.where(mask, ids[:, :t_all], 0).astype(np.int32)
    offset = np.zeros(len(pairs), np.float32)
    return EditDataset(ids, mask, tpos, tids, tmask, seq_len, tgt_len, weight, offset, kept, skipped, n_edits,
                       skipped_retain)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded shuffle of epoch ``epoch``: a pure function of (seed, epoch), so resumes replay it."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
