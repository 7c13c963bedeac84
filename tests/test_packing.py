"""Sequence packing: layouts are exact, a packed row computes what separate rows do, training agrees."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from locft_jax import load_model
from locft_jax import model as M
from locft_jax.engine import EditConfig, edit
from locft_jax.engine.dataset import batches, epoch_order, prepare_dataset
from locft_jax.engine.packing import (
    PackShape,
    first_fit_decreasing,
    layout,
    plan_shape,
    plan_shapes,
    row_lengths,
    rows_needed,
    shape_for,
    slot_lengths,
)
from locft_jax.requests import EditRequest
from tests.test_engine import FAST, ONE_DEVICE, REQUESTS


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(tiny_llama_dir)


def test_first_fit_decreasing_fills_bins_within_capacity():
    lengths = [7, 3, 9, 2, 5, 5, 8, 1]
    bins = first_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 40 tokens need at least 4 bins of 10
    with pytest.raises(ValueError, match="11-token request does not fit a packed row of 10"):
        first_fit_decreasing([11], 10)


def test_layout_places_each_request_contiguously_in_its_own_shards_rows():
    lengths = np.array([5, 3, 0, 6, 2, 4, 4, 0])  # 8 slots over 2 shards; slots 2 and 7 empty
    targets = np.array([2, 1, 0, 3, 1, 2, 2, 0])
    shape = PackShape(rows=4, length=8, targets=12)
    plan = layout(lengths, targets, shards=2, shape=shape)
    for b, n in enumerate(lengths):
        where = np.argwhere(plan.slot == b)
        assert len(where) == n
        assert (plan.target_slot == b).sum() == targets[b]
        if n == 0:
            continue
        row = where[0, 0]
        assert (where[:, 0] == row).all() and row // 2 == b // 4  # one row, on the slot's own shard
        cols = where[:, 1]
        assert (np.diff(cols) == 1).all() and plan.start[b] == row * shape.length + cols[0]
        assert (plan.pos[row, cols] == np.arange(n)).all()
        flat = np.flatnonzero(plan.target_slot == b)
        assert (np.diff(flat) == 1).all() and flat[0] // 6 == b // 4  # contiguous, on its own shard
        assert (plan.target_index[flat] == np.arange(targets[b])).all()
    assert (plan.slot == -1).sum() == shape.rows * shape.length - lengths.sum()
    with pytest.raises(ValueError, match="needs 2 packed rows on shard 0, the shape has 1"):
        layout(lengths, targets, shards=2, shape=PackShape(rows=2, length=8, targets=12))
    with pytest.raises(ValueError, match="more than the shape's 4 target tokens on shard 0"):
        layout(lengths, targets, shards=2, shape=PackShape(rows=4, length=8, targets=8))


def test_plan_shape_fits_every_batch_of_every_epoch():
    rng = np.random.default_rng(0)
    seq_len, tgt_len = rng.integers(3, 20, size=37), rng.integers(1, 7, size=37)
    epoch_batches = [batches(epoch_order(37, 0, e), 16) for e in range(5)]
    shape = plan_shape(seq_len, tgt_len, epoch_batches, batch_rows=16, shards=2)
    assert shape.rows % 2 == 0 and shape.targets % 2 == 0 and shape.length >= seq_len.max()
    for rows in (r for epoch in epoch_batches for r in epoch):
        lengths, targets = slot_lengths(seq_len, rows, 16), slot_lengths(tgt_len, rows, 16)
        assert rows_needed(lengths, 2, shape.length) <= shape.rows
        layout(lengths, targets, 2, shape)  # does not raise
    assert shape.rows * shape.length < 16 * 24  # fewer tokens than one 24-token bucket row per request
    assert shape.targets < 16 * 8  # fewer LM-head positions than every slot at the 8-token target bucket


def test_plan_shape_picks_the_row_length_with_the_fewest_tokens_not_only_bucket_multiples():
    """100 requests of 14 tokens: 4 fill a 56-token row exactly; the 64-token bucket multiple would pad 8 per row."""
    seq_len, tgt_len = np.full(100, 14), np.full(100, 2)
    assert list(row_lengths(16)) == [16, 24, 32, 40, 48, 56, 64]
    assert list(row_lengths(512))[:3] == [512, 640, 768] and len(row_lengths(512)) == 13
    shape = plan_shape(seq_len, tgt_len, [batches(epoch_order(100, 0, 0), 100)], batch_rows=100, shards=1)
    assert (shape.rows, shape.length, shape.targets) == (25, 56, 200)


def test_a_packed_row_computes_what_separate_rows_do(tiny):
    ids = [list(tiny.tokenizer(t)["input_ids"]) for t in ("The capital of France is", "Hello", "One two three")]
    alone = [M.hidden_states(tiny.params, tiny.config, jnp.asarray([x]))[0] for x in ids]
    flat = sum(ids, []) + [0, 0]  # two padding tokens at the end
    segments = sum(([k] * len(x) for k, x in enumerate(ids)), []) + [-1, -1]
    positions = sum((list(range(len(x))) for x in ids), []) + [0, 0]
    ctx = M.make_context(tiny.config, jnp.asarray([[s >= 0 for s in segments]]), jnp.asarray([positions]),
                         jnp.asarray([segments]))
    h = M.run_layers(tiny.params, M.embed(tiny.params, jnp.asarray([flat])), ctx, tiny.config)
    packed = M.final_norm(tiny.params, h, tiny.config)[0]
    offset = 0
    for x, want in zip(ids, alone, strict=True):
        np.testing.assert_allclose(np.asarray(packed[offset : offset + len(x)]), np.asarray(want), atol=1e-5)
        offset += len(x)


@pytest.mark.parametrize("module, prefix_cache", [("mlp_down", True), ("mlp_down", False), ("attn", True),
                                                  ("layer", True)])
def test_packed_training_gives_the_same_weights_as_unpacked(tiny, module, prefix_cache):
    cfg = EditConfig(layers=(1,), module=module, prefix_cache=prefix_cache, **FAST)
    packed = edit(tiny, REQUESTS, cfg, mesh=ONE_DEVICE)
    unpacked = edit(tiny, REQUESTS, cfg.replace(packing=False), mesh=ONE_DEVICE)
    for name in unpacked.trainable:
        np.testing.assert_allclose(np.asarray(packed.trainable[name]), np.asarray(unpacked.trainable[name]),
                                   atol=1e-5, err_msg=name)
    for a, b in zip(packed.log, unpacked.log, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_packing_runs_fewer_tokens_than_padding_each_request(tiny):
    from locft_jax.engine.loop import pack_plan_for

    ds = prepare_dataset(tiny.tokenizer, REQUESTS[:8])  # two full batches of 4: one shape
    cfg = EditConfig(**FAST)
    (slots, shape), = pack_plan_for(ds, cfg, ONE_DEVICE).items()
    padded = [cfg.batch_size * ds.shape_of(rows)[0] for rows in batches(epoch_order(len(ds), 0, 0), cfg.batch_size)]
    assert slots == cfg.batch_size and shape.rows * shape.length < max(padded)
    assert pack_plan_for(ds, cfg.replace(packing=False), ONE_DEVICE) is None
    assert pack_plan_for(ds, cfg.replace(pipeline="df"), ONE_DEVICE) is None


def test_a_short_last_batch_gets_one_smaller_shape_of_its_own():
    rng = np.random.default_rng(1)
    seq_len, tgt_len = rng.integers(3, 20, size=37), rng.integers(1, 7, size=37)
    epoch_batches = [batches(epoch_order(37, 0, e), 16) for e in range(5)]  # 16, 16, 5 each epoch
    plan = plan_shapes(seq_len, tgt_len, epoch_batches, batch_rows=16, shards=2)
    assert sorted(plan) == [6, 16]  # the 5-request batch: 6 slots (3 per shard), not 16
    assert plan[6].rows * plan[6].length < plan[16].rows * plan[16].length
    assert plan[6].targets < plan[16].targets
    for rows in (r for epoch in epoch_batches for r in epoch):
        slots, shape = shape_for(plan, len(rows))
        assert slots == (16 if len(rows) == 16 else 6)
        layout(slot_lengths(seq_len, rows, slots), slot_lengths(tgt_len, rows, slots), 2, shape)  # fits
    # a nearly full last batch (13 of 16 > 3/4) and one that is the whole run keep a single shape
    assert list(plan_shapes(seq_len[:29], tgt_len[:29], [batches(epoch_order(29, 0, 0), 16)], 16, 2)) == [16]
    assert list(plan_shapes(seq_len[:5], tgt_len[:5], [batches(epoch_order(5, 0, 0), 16)], 16, 2)) == [6]


def test_a_packed_run_compiles_once_whatever_its_batches_lengths(tiny):
    mixed = [EditRequest("Q" + " word" * (i % 7), "a" + " b" * (i % 5)) for i in range(12)]
    ds = prepare_dataset(tiny.tokenizer, mixed)
    shapes = {ds.shape_of(rows) for e in range(3) for rows in batches(epoch_order(len(ds), 0, e), 4)}
    assert len(shapes) > 1  # unpacked, these batches would need several compiles
    cfg = EditConfig(layers=(2,), **{**FAST, "lr": 2.345e-3, "epochs": 3})  # a setting no other test compiled
    assert edit(tiny, mixed, cfg, mesh=ONE_DEVICE).compiles == 1
