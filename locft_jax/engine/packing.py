"""Sequence packing: the requests of a batch laid end to end in a few rows, instead of one padded row each.

Edit prompts are short and of mixed length, so padding every request to its batch's longest row
(and that to a shape bucket) wastes about half the step's work. Packed, each row holds several
requests back to back; a request attends only to itself (segment mask) and sees its own positions
(RoPE restarts at 0), so the loss is the same function of the weights as unpacked — only the
rounding order of the sums changes.

The layout of a batch is a pure function of its requests' lengths. Rows stay data-parallel: the
batch's request slots are split over the mesh's data axis as before, and each shard's requests are
packed into that shard's own rows (first-fit decreasing), so nothing crosses devices. Target
tokens are laid end to end too (the LM head runs on each real target token, not on every slot
padded to the longest target). One ``PackShape`` serves every full batch of the run — found from
every epoch's batches up front — so the step compiles once; an epoch's short last batch gets a
second, smaller shape when it is at most ``SHORT_BATCH_SHARE`` of a full one (one more compile,
whatever the number of epochs, instead of running a mostly empty full-size step every epoch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from locft_jax.tokens import DEFAULT_BUCKETS, bucket

MAX_LENGTH_MULTIPLE = 4  # packed row lengths tried: from the longest request's bucket to 4× it
SHORT_BATCH_SHARE = 0.75  # a short last batch with at most this share of a full batch's slots gets its own shape


@dataclasses.dataclass(frozen=True)
class PackShape:
    rows: int  # packed rows per batch (a multiple of the data-axis size)
    length: int  # tokens per packed row
    targets: int  # target tokens per batch, all slots' laid end to end (a multiple of the data-axis size)


PackPlan = dict[int, PackShape]  # a run's packed shapes, keyed by the batch slot count each serves


def round_to_shards(n: int, shards: int) -> int:
    """``n`` slots rounded up to split evenly over ``shards`` data shards."""
    return -(-n // shards) * shards


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Where each token of a packed batch comes from, and where its target tokens are.

    ``slot[r, t]``: the batch slot (0..B-1) whose request fills row r at t, -1 for padding;
    ``pos[r, t]``: that token's position in its request; ``start[b]``: the flat index
    ``row * length + offset`` of slot b's first token (0 for empty slots). Targets, flat:
    ``target_slot[p]`` (-1 for padding) and ``target_index[p]``, the target token's index in its slot.
    """

    slot: np.ndarray  # [R, L] int32
    pos: np.ndarray  # [R, L] int32
    start: np.ndarray  # [B] int32
    target_slot: np.ndarray  # [P] int32
    target_index: np.ndarray  # [P] int32


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of ``capacity`` tokens (longest first, first bin that fits)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"a {n}-token request does not fit a packed row of {capacity}")
        for b, free in enumerate(room):
            if free >= n:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def _shard_bins(slot_lengths: np.ndarray, shards: int, length: int) -> list[list[list[int]]]:
    """Per shard, its slots (global indices) grouped into rows; empty slots (length 0) left out."""
    per_shard = len(slot_lengths) // shards
    out = []
    for s in range(shards):
        slots = np.arange(s * per_shard, (s + 1) * per_shard)
        slots = slots[slot_lengths[slots] > 0]
        out.append([[int(slots[i]) for i in b] for b in first_fit_decreasing(slot_lengths[slots], length)])
    return out


def slot_lengths(seq_len: np.ndarray, rows: np.ndarray, batch_rows: int) -> np.ndarray:
    """Token count of each of a batch's ``batch_rows`` slots (0 past the batch's requests)."""
    out = np.zeros(batch_rows, np.int64)
    out[: len(rows)] = seq_len[rows]
    return out


def layout(lengths: np.ndarray, target_lengths: np.ndarray, shards: int, shape: PackShape) -> PackedLayout:
    """Pack one batch (token and target counts per slot) into ``shape``; shard s's slots go to shard s's rows."""
    rows_per_shard, targets_per_shard = shape.rows // shards, shape.targets // shards
    slot = np.full((shape.rows, shape.length), -1, np.int32)
    pos = np.zeros((shape.rows, shape.length), np.int32)
    start = np.zeros(len(lengths), np.int32)
    target_slot = np.full(shape.targets, -1, np.int32)
    target_index = np.zeros(shape.targets, np.int32)
    for s, bins in enumerate(_shard_bins(lengths, shards, shape.length)):
        if len(bins) > rows_per_shard:
            raise ValueError(f"batch needs {len(bins)} packed rows on shard {s}, the shape has {rows_per_shard}")
        for r, members in enumerate(bins, start=s * rows_per_shard):
            offset = 0
            for b in members:
                n = int(lengths[b])
                slot[r, offset : offset + n] = b
                pos[r, offset : offset + n] = np.arange(n)
                start[b] = r * shape.length + offset
                offset += n
        t = s * targets_per_shard
        for b in range(s * len(lengths) // shards, (s + 1) * len(lengths) // shards):
            n = int(target_lengths[b])
            if t + n > (s + 1) * targets_per_shard:
                raise ValueError(f"batch needs more than the shape's {targets_per_shard} target tokens on shard {s}")
            target_slot[t : t + n], target_index[t : t + n] = b, np.arange(n)
            t += n
    return PackedLayout(slot, pos, start, target_slot, target_index)


def rows_needed(lengths: np.ndarray, shards: int, length: int) -> int:
    """Packed rows a batch needs at ``length`` tokens per row: the busiest shard's count × shards."""
    return shards * max(len(bins) for bins in _shard_bins(lengths, shards, length))


def targets_needed(target_lengths: np.ndarray, shards: int) -> int:
    """Flat target slots a batch needs: the busiest shard's target tokens × shards."""
    return shards * int(target_lengths.reshape(shards, -1).sum(1).max())


def plan_shape(
    seq_len: np.ndarray,
    tgt_len: np.ndarray,
    epoch_batches: Sequence[Sequence[np.ndarray]],
    batch_rows: int,
    shards: int,
) -> PackShape:
    """One shape for every batch of the run.

    Row lengths tried (``row_lengths``): from the bucket of the longest request to
    ``MAX_LENGTH_MULTIPLE`` times it; the one whose rows hold the fewest tokens wins (ties: the
    shorter, whose attention is cheaper). The row count of a length is the most any batch of any
    epoch needs at it; a length stops being counted once it cannot win.
    """
    every_batch = [slot_lengths(seq_len, rows, batch_rows) for batches in epoch_batches for rows in batches]
    best_rows, best_length = None, None
    for length in row_lengths(bucket(int(seq_len.max()), DEFAULT_BUCKETS)):
        rows = 0
        for lengths in every_batch:
            rows = max(rows, rows_needed(lengths, shards, length))
            if best_rows is not None and rows * length >= best_rows * best_length:
                break
        else:
            best_rows, best_length = rows, length
    targets = max(
        targets_needed(slot_lengths(tgt_len, batch, batch_rows), shards) for epoch in epoch_batches for batch in epoch
    )
    return PackShape(best_rows, best_length, targets)


def row_lengths(base: int) -> range:
    """Packed row lengths to try for requests of at most ``base`` tokens: ``base`` up to
    ``MAX_LENGTH_MULTIPLE × base`` in steps of ``max(8, base // 4)`` (at most 13 lengths). Finer than
    the multiples of ``base``: 14-token requests fill a 56-token row (4 each), not a 64-token one."""
    return range(base, MAX_LENGTH_MULTIPLE * base + 1, max(8, base // 4))


def plan_shapes(
    seq_len: np.ndarray,
    tgt_len: np.ndarray,
    epoch_batches: Sequence[Sequence[np.ndarray]],
    batch_rows: int,
    shards: int,
) -> PackPlan:
    """The run's shapes by slot count: ``batch_rows`` for full batches, and a smaller one for the epochs'
    short last batch when it holds at most ``SHORT_BATCH_SHARE`` of ``batch_rows`` (rounded up to ``shards``).

    Every epoch visits the same requests, so its batch sizes are the same: at most two shapes.
    """
    short = round_to_shards(min(len(batch) for epoch in epoch_batches for batch in epoch), shards)
    if short > SHORT_BATCH_SHARE * batch_rows:
        return {batch_rows: plan_shape(seq_len, tgt_len, epoch_batches, batch_rows, shards)}
    plan = {}
    for slots, fits in ((batch_rows, lambda n: n > short), (short, lambda n: n <= short)):
        group = [[batch for batch in epoch if fits(len(batch))] for epoch in epoch_batches]
        if group[0]:
            plan[slots] = plan_shape(seq_len, tgt_len, group, slots, shards)
    return plan


def shape_for(plan: PackPlan, n_rows: int) -> tuple[int, PackShape]:
    """(slot count, shape) of the smallest planned shape that holds a batch of ``n_rows`` requests."""
    slots = min(s for s in plan if s >= n_rows)
    return slots, plan[slots]
