"""Device mesh and the rules that map logical weight axes onto it.

The mesh has two axes: ``data`` (the batch is split over it: data parallelism, what ``pmap`` used
to do) and ``model`` (weights too large for one device are split over it, tensor-parallel style).
One rules table decides which logical axis goes to which mesh axis; GSPMD inserts the collectives.
Multi-host: join the run first (``locft_jax.hosts.init_distributed``); ``jax.devices()`` then lists
every device of every host, and the same code runs on each.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from locft_jax.config import ModelConfig
from locft_jax.params import Params, is_axes_leaf, logical_axes

DATA_AXIS = "data"
MODEL_AXIS = "model"

# Replicate every weight: the right choice whenever the model fits on one device.
REPLICATED_RULES: Mapping[str, str | None] = {}
# Split the large inner dimensions over the model axis (Megatron-style tensor parallelism).
TENSOR_PARALLEL_RULES: Mapping[str, str | None] = {
    "heads": MODEL_AXIS,
    "kv_heads": MODEL_AXIS,
    "mlp": MODEL_AXIS,
    "vocab": MODEL_AXIS,
}


def make_mesh(model_parallel: int = 1, devices: list | None = None) -> Mesh:
    """A ``(data, model)`` mesh over all devices: ``model_parallel`` devices share each weight."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) % model_parallel:
        raise ValueError(f"model_parallel={model_parallel} does not divide the {len(devices)} devices")
    grid = np.array(devices).reshape(len(devices) // model_parallel, model_parallel)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def spec_for(
    shape: tuple[int, ...], axes: tuple[str, ...], mesh: Mesh, rules: Mapping[str, str | None]
) -> PartitionSpec:
    """PartitionSpec for one weight; a dim that does not divide evenly stays replicated."""
    parts = []
    for dim, name in zip(shape, axes, strict=True):
        mesh_axis = rules.get(name)
        if mesh_axis is not None and dim % mesh.shape[mesh_axis] == 0 and mesh_axis not in parts:
            parts.append(mesh_axis)
        else:
            parts.append(None)
    return PartitionSpec(*parts)


def param_shardings(
    config: ModelConfig, shapes: Params, mesh: Mesh, rules: Mapping[str, str | None] = REPLICATED_RULES
) -> Params:
    """A params-shaped pytree of ``NamedSharding`` (``shapes``: params or their ShapeDtypeStructs).

    Warns (``UserWarning``) when a rule asks to split a dim that the mesh axis does not divide:
    that weight stays whole on every device, which can be what makes a large model not fit.
    """
    axes = logical_axes(config)
    whole: dict[str, int] = {}  # "axis name width" → bytes kept whole on each device

    def sharding(ax: tuple[str, ...], x: Any) -> NamedSharding:
        shape = tuple(x.shape)
        for dim, name in zip(shape, ax, strict=True):
            mesh_axis = rules.get(name)
            if mesh_axis is not None and mesh.shape[mesh_axis] > 1 and dim % mesh.shape[mesh_axis]:
                key = f"{name} width {dim}"
                whole[key] = whole.get(key, 0) + int(np.prod(shape)) * np.dtype(x.dtype).itemsize
        return NamedSharding(mesh, spec_for(shape, tuple(ax), mesh, rules))

    out = jax.tree.map(sharding, axes, shapes, is_leaf=is_axes_leaf)
    if whole:
        listed = ", ".join(f"{key} ({size / 2**20:.1f} MiB)" for key, size in whole.items())
        warnings.warn(
            f"{listed}: not divisible by the model axis ({mesh.shape.get(MODEL_AXIS, 1)} devices), "
            "so those weights stay whole on every device",
            stacklevel=2,
        )
    return out


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Split the leading (batch) dim over ``data``; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def rows_over_data(params: Params, rows: int) -> tuple[int, jax.sharding.Sharding | None, int]:
    """``(rows, sharding, data)`` for an evaluation batch on the devices holding ``params``: ``rows``
    rounded up to a multiple of their mesh's data axis (``data`` devices) and the sharding that splits
    a batch's leading dim over it, so each device scores its own rows. A mesh without a data axis:
    replicated on it; one device: its sharding; host arrays: ``None`` (JAX's default device)."""
    sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return rows, sharding, 1
    if DATA_AXIS not in sharding.mesh.shape:
        return rows, replicated(sharding.mesh), 1
    data = sharding.mesh.shape[DATA_AXIS]
    return -(-rows // data) * data, NamedSharding(sharding.mesh, PartitionSpec(DATA_AXIS)), data


def host_array(x: jax.Array) -> np.ndarray:
    """``x`` as a numpy array; split over several hosts, gathered first (every process must call this)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
