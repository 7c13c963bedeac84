"""The per-request inputs of the trainable part, kept where the train step can gather them.

With the prefix cache on, each request's activations at the cache point are computed once
(streaming, in fixed-size chunks) and stored; without it the store holds the token ids and every
step runs the whole model. The store lives on device when it fits the budget, else on the host
(each step then receives its batch's rows). The default budget (``device_budget``) is half
an accelerator's free memory, and ``CPU_DEVICE_BYTES`` on CPU, where "device" is host memory too.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from locft_jax.config import ModelConfig
from locft_jax.engine import packing
from locft_jax.engine.dataset import EditDataset
from locft_jax.engine.forward import prefix_inputs
from locft_jax.engine.locations import CachePoint, Location
from locft_jax.engine.packing import PackPlan, PackShape
from locft_jax.params import Params
from locft_jax.sharding import DATA_AXIS, batch_sharding, replicated
from locft_jax.tokens import bucket

CHUNK_ROWS = 32
# On an accelerator a chunk of 32 short prompts is a few hundred tokens: 256-row chunks built an
# H200's cache 6-11 % faster (docs/BENCHMARKS.md, GPU).
ACCELERATOR_CHUNK_ROWS = 256
# On CPU "device" memory is host RAM: up to this size the cache is kept as device arrays (the step
# gathers its rows), past it each batch's rows are sent. Set when a device store was a second copy
# of a host-built one; since the device store is built in place it no longer is.
CPU_DEVICE_BYTES = 2 << 30


@dataclasses.dataclass
class Store:
    """Arrays of shape [N, ...] per request: model inputs, mask and targets."""

    arrays: dict[str, jax.Array | np.ndarray]
    on_device: bool
    cache_bytes: int  # bytes of cached activations (0 without the cache)

    def rows(self, rows: np.ndarray) -> dict[str, jax.Array | np.ndarray]:
        """For a host store: just the batch's rows (the step then gathers 0..B-1)."""
        return {k: v[rows] for k, v in self.arrays.items()}


def build_store(
    params: Params,
    config: ModelConfig,
    location: Location,
    point: CachePoint | None,
    ds: EditDataset,
    mesh: Mesh,
    device_budget_bytes: int | None = None,
) -> Store:
    """Every request's step inputs (cached activations at ``point``, or token ids when it is None).

    On device (replicated over ``mesh``) when the cache fits ``device_budget_bytes`` (None: the
    default: ``device_budget`` of the mesh's devices), else on the host. A device cache is written
    on device chunk by chunk, so it never passes through (or doubles in) host memory.
    """
    host = {
        "mask": ds.mask,
        "target_pos": ds.target_pos,
        "target_ids": ds.target_ids,
        "target_mask": ds.target_mask,
        "weight": ds.weight,
        "loss_offset": ds.loss_offset,
    }
    shapes = {} if point is None else prefix_shapes(params, config, location, point, ds)
    if point is None:
        host["ids"] = ds.ids
    cache_bytes = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in shapes.values())
    if device_budget_bytes is None:
        device_budget_bytes = device_budget(mesh.devices.flat)
    on_device = cache_bytes <= device_budget_bytes
    cached = {} if point is None else compute_prefix(params, config, location, point, ds, mesh, on_device, shapes)
    if on_device:
        arrays = {k: jax.device_put(v, replicated(mesh)) for k, v in host.items()} | cached
    else:
        arrays = host | cached
    return Store(arrays, on_device, cache_bytes)


def prefix_shapes(
    params: Params, config: ModelConfig, location: Location, point: CachePoint, ds: EditDataset
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each cached array for all of ``ds`` (nothing is computed)."""
    n, width = ds.ids.shape
    ids = jax.ShapeDtypeStruct((1, width), ds.ids.dtype)
    mask = jax.ShapeDtypeStruct((1, width), ds.mask.dtype)
    out = jax.eval_shape(lambda p, i, m: prefix_inputs(p, config, location, point, i, m), params, ids, mask)
    return {k: ((n, *v.shape[1:]), v.dtype) for k, v in out.items()}


def device_budget(devices) -> int:
    """The store's default device budget: half the smallest free memory of ``devices``.

    The store is replicated, so every device must hold all of it. CPU devices, and backends that
    report no memory statistics, get ``CPU_DEVICE_BYTES``.
    """
    free = []
    for device in devices:
        stats = device.memory_stats() if device.platform != "cpu" else None
        if not stats or "bytes_limit" not in stats:
            return CPU_DEVICE_BYTES
        free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return min(free) // 2


def compute_prefix(
    params: Params,
    config: ModelConfig,
    location: Location,
    point: CachePoint,
    ds: EditDataset,
    mesh: Mesh | None = None,
    on_device: bool = False,
    shapes: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None,
) -> dict[str, np.ndarray | jax.Array]:
    """Run the frozen layers once over all requests, ``CHUNK_ROWS`` at a time (on an accelerator
    ``ACCELERATOR_CHUNK_ROWS``).

    Rows go in length order, so each chunk runs at the bucket of its own longest row (not the
    whole set's); positions past a row's chunk length stay zero — padding the step masks anyway.
    With a ``mesh``, each chunk's rows are split over its data axis (every device computes its
    share, not the whole chunk). Compiles once per sequence bucket met. The result is host arrays,
    or with ``on_device`` (needs ``mesh``) arrays replicated over ``mesh`` that each chunk is written
    into where it was computed: no copy of the cache passes through the host. ``shapes``: the
    caller's ``prefix_shapes`` of the same arguments, when it has them (else traced here).
    """
    if on_device and mesh is None:
        raise ValueError("compute_prefix(on_device=True) needs a mesh")
    n, width = ds.ids.shape
    device = jax.devices()[0] if mesh is None else mesh.devices.flat[0]
    chunk_rows = CHUNK_ROWS if device.platform == "cpu" else ACCELERATOR_CHUNK_ROWS
    if mesh is not None:
        chunk_rows = slots_per_batch(chunk_rows, mesh)
    shapes = shapes or prefix_shapes(params, config, location, point, ds)
    if on_device:
        out = {k: jnp.zeros(shape, dtype, device=replicated(mesh)) for k, (shape, dtype) in shapes.items()}
        write_rows = _row_writer(replicated(mesh))
    else:
        out = {k: np.zeros(shape, dtype) for k, (shape, dtype) in shapes.items()}
    by_length = np.argsort(ds.seq_len, kind="stable")
    for start in range(0, n, chunk_rows):
        # the last chunk wraps to keep its row count (one compile per bucket, not per size)
        rows = by_length[np.arange(start, start + chunk_rows) % n]
        keep = min(chunk_rows, n - start)
        seq = min(width, bucket(int(ds.seq_len[rows[:keep]].max())))
        ids, mask = ds.ids[rows, :seq], ds.mask[rows, :seq]
        if mesh is not None:
            ids, mask = jax.device_put((ids, mask), batch_sharding(mesh, 2))
        values = _prefix(params, config, location, point, ids, mask)
        if on_device:
            # wrapped rows point past the end and are dropped
            target = jax.device_put(np.where(np.arange(chunk_rows) < keep, rows, n).astype(np.int32), replicated(mesh))
            out = write_rows(out, target, values)
        else:
            for key, value in values.items():
                out[key][rows[:keep], :seq] = np.asarray(value[:keep])
    # a device build is dispatched asynchronously: finish it here, not inside the first train step
    return jax.block_until_ready(out)


@functools.lru_cache
def _row_writer(sharding):
    """A jitted ``out[key][rows, :seq] = values[key]`` for every key, in place (``out`` donated) and
    kept in ``sharding``; rows ≥ len(out) are dropped."""

    def write(out, rows, values):
        return {k: v.at[rows, : values[k].shape[1]].set(values[k], mode="drop") for k, v in out.items()}

    return jax.jit(write, donate_argnums=0, out_shardings=sharding)


def slots_per_batch(rows_per_batch: int, mesh: Mesh) -> int:
    """A batch's slot count: ``rows_per_batch`` rounded up to split evenly over the data axis."""
    return packing.round_to_shards(rows_per_batch, mesh.shape[DATA_AXIS])


class BatchFeeder:
    """Row indices → the train step's inputs, padded to a fixed slot count (one compile per shape).

    Returns ``(arrays, feed, seq_len, tgt_len)``: ``feed`` holds ``index`` (the store row of each
    slot: with a device store the step gathers them itself; with a host store only the batch's
    rows are sent) and ``valid``; with a ``pack`` plan also the batch's packing layout
    (``packing.layout``) in the plan's smallest shape that holds it, and ``seq_len``/``tgt_len``
    are that shape's row length and target count.
    """

    def __init__(self, store: Store, ds: EditDataset, rows_per_batch: int, mesh: Mesh, pack: PackPlan | None = None):
        self.store, self.ds, self.mesh, self.pack = store, ds, mesh, pack
        self.batch_rows = slots_per_batch(rows_per_batch, mesh)

    def __call__(self, rows: np.ndarray) -> tuple:
        slots, shape = (self.batch_rows, None) if self.pack is None else packing.shape_for(self.pack, len(rows))
        padded = np.zeros(slots, np.int32)
        padded[: len(rows)] = rows
        feed = {"valid": np.arange(slots) < len(rows)}
        if self.store.on_device:
            arrays, feed["index"] = self.store.arrays, padded
        else:
            arrays = jax.device_put(self.store.rows(padded), replicated(self.mesh))
            feed["index"] = np.arange(slots, dtype=np.int32)
        if shape is not None:
            feed.update(self._packed(rows, padded, shape))
            seq_len, tgt_len = shape.length, shape.targets
        else:
            seq_len, tgt_len = self.ds.shape_of(rows)
        feed = jax.device_put(feed, {k: batch_sharding(self.mesh, v.ndim) for k, v in feed.items()})
        return arrays, feed, seq_len, tgt_len

    def _packed(self, rows: np.ndarray, slot_rows: np.ndarray, shape: PackShape) -> dict[str, np.ndarray]:
        """The batch's packing layout in ``shape``, with each target token's flat position and id."""
        ds, slots = self.ds, len(slot_rows)
        plan = packing.layout(packing.slot_lengths(ds.seq_len, rows, slots),
                              packing.slot_lengths(ds.tgt_len, rows, slots),
                              self.mesh.shape[DATA_AXIS], shape)
        slot = np.maximum(plan.target_slot, 0)
        row, u = slot_rows[slot], plan.target_index
        return {"slot": plan.slot, "pos": plan.pos, "target_slot": plan.target_slot,
                "target_at": (plan.start[slot] + ds.target_pos[row, u]).astype(np.int32),
                "target_ids": ds.target_ids[row, u]}


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _prefix(params, config, location, point, ids, mask):
    return prefix_inputs(params, config, location, point, ids, mask)
