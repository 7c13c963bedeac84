"""The processes of a multi-host run: joining one, which process writes files, and keeping them in step.

Every process of a multi-host run (a TPU pod's hosts, or several GPU/CPU processes) runs the same
program on its own devices; ``jax.devices()`` lists the devices of all of them, and every jitted
computation runs on all of them together. Files are another matter: the run directory, the log,
reports and the HF export are written once, by process 0 (the *primary*), while every process
takes part in the computations that produce them. Checkpoints are written by every process
(orbax: each its own shards), so their directory must be on a file system every host sees.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np


def init_distributed() -> None:
    """Join a multi-host run when launched as one.

    ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0) with ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` set by hand or by a launcher; or ``LOCFT_MULTIHOST=1`` where JAX detects
    the cluster itself (Cloud TPU pods, SLURM, Open MPI, Kubernetes). Neither set (or
    ``LOCFT_MULTIHOST=0``): a no-op.
    """
    if not (os.environ.get("JAX_COORDINATOR_ADDRESS") or _switched_on("LOCFT_MULTIHOST")):
        return
    counts = {}
    for key, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if value := os.environ.get(env):
            try:
                counts[key] = int(value)
            except ValueError:
                raise ValueError(f"{env}={value!r} is not an integer") from None
    jax.distributed.initialize(**counts)


def _switched_on(env: str) -> bool:
    """An on/off environment variable: 1/true/yes/on or 0/false/no/off (any case); unset or empty is off."""
    value = os.environ.get(env, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{env}={os.environ[env]!r}: use 1 (on) or 0 (off)")


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; always true in a single-process run)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def same_on_every_process(value: int, what: str) -> None:
    """Raise unless every process holds the same ``value`` (e.g. the epoch a resumed run starts at)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.assert_equal(np.int32(value), f"processes disagree on {what}")


def shared_timestamp() -> str:
    """Process 0's local time as ``YYYYmmdd-HHMMSS``, on every process (run names that embed it then agree)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if jax.process_count() == 1:
        return stamp
    from jax.experimental import multihost_utils

    shared = multihost_utils.broadcast_one_to_all(np.frombuffer(stamp.encode(), np.uint8))
    return bytes(np.asarray(shared, np.uint8)).decode()
