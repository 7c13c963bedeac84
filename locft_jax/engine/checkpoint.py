"""Epoch-boundary training checkpoints (orbax): trainable tensors, optimizer state, epoch, log.

The shuffle of epoch ``e`` is a pure function of (seed, e), so no RNG state is needed: a resumed
run replays exactly the steps an uninterrupted run would take. Orbax finalises each checkpoint by
renaming a temporary directory, so a killed save leaves no corrupt checkpoint behind.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from locft_jax.files import write_text_atomic
from locft_jax.hosts import barrier, is_primary

KEEP = 2
_NAME = re.compile(r"^epoch_(\d+)$")


def _epoch_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / "meta.json").exists()]
    return sorted(found)


def save_state(root: Path, epoch: int, trainable: dict, opt_state: Any, meta: dict[str, Any]) -> Path:
    """Save after ``epoch`` (0-based) finished; keep the last ``KEEP`` checkpoints.

    Multi-host: every process saves its shards through orbax; process 0 alone removes and writes
    the files around them, between barriers.
    """
    root = Path(root).absolute()
    path = root / f"epoch_{epoch:04d}"
    primary = is_primary()
    if primary:
        root.mkdir(parents=True, exist_ok=True)
        if path.exists():
            shutil.rmtree(path)
    barrier(f"checkpoint {epoch}: cleared")
    state = {"trainable": trainable, "opt_state": {str(i): x for i, x in enumerate(jax.tree.leaves(opt_state))}}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / "state", state)
    checkpointer.wait_until_finished()
    if primary:
        # meta.json is written last: a directory without it is an unfinished save and is ignored.
        write_text_atomic(path / "meta.json", json.dumps({"epoch": epoch, **meta}))
        for _, old in _epoch_dirs(root)[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(f"checkpoint {epoch}: saved")
    return path


def latest_state(root: Path) -> Path | None:
    dirs = _epoch_dirs(Path(root).absolute())
    return dirs[-1][1] if dirs else None


def epoch_of(path: Path | None) -> int:
    """The epoch a checkpoint directory from ``latest_state`` holds; -1 for none."""
    return -1 if path is None else int(_NAME.match(Path(path).name).group(1))


def restore_state(path: Path, trainable_like: dict, opt_state_like: Any) -> tuple[dict, Any]:
    """(trainable, opt_state) from ``path``, with the structure and shardings of the ``*_like``
    (its ``meta.json``: ``read_meta``, to check first)."""
    leaves, treedef = jax.tree.flatten(opt_state_like)
    target = {
        "trainable": jax.tree.map(ocp.utils.to_shape_dtype_struct, trainable_like),
        "opt_state": {str(i): ocp.utils.to_shape_dtype_struct(x) for i, x in enumerate(leaves)},
    }
    state = ocp.StandardCheckpointer().restore(Path(path).absolute() / "state", target)
    opt_state = jax.tree.unflatten(treedef, [state["opt_state"][str(i)] for i in range(len(leaves))])
    return state["trainable"], opt_state


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's ``meta.json``: epoch, log, fingerprint (check it before ``restore_state``)."""
    return json.loads((Path(path) / "meta.json").read_text())


def tensor_checksums(tensors: dict[str, jax.Array]) -> dict[str, list]:
    """Name → [shape, checksum of the bits]: an integer sum (mod 2³²) of each element's bits times a
    function of its index, so the same on any mesh or reduction order, and cheap (one pass, on device)."""
    return {name: [list(x.shape), int(_bit_checksum(x))] for name, x in tensors.items()}


@jax.jit
def _bit_checksum(x: jax.Array) -> jax.Array:
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32).reshape(-1)
    index = jnp.arange(bits.size, dtype=jnp.uint32)
    return jnp.sum(bits * (index * jnp.uint32(2654435761) + jnp.uint32(1)), dtype=jnp.uint32)


def fingerprint(*parts: Any) -> str:
    """A short hash of the run's identity (config, data) to refuse resuming a different run."""

    h = hashlib.sha256()
    for part in parts:
        h.update(part.tobytes() if isinstance(part, np.ndarray) else json.dumps(part, sort_keys=True).encode())
    return h.hexdigest()[:16]
