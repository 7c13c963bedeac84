"""What every ``python -m convert.*`` command shares: dtype flags, loading params for a
conversion, and one clear line with exit code 2 on bad input."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convert.errors import CheckpointError
from convert.sources import Checkpoint
from locft_jax.config import ConfigError
from locft_jax.loading import params_from_tensors
from locft_jax.params import Params
from locft_jax.sharding import make_mesh

EXIT_BAD_INPUT = 2
# Errors that mean "this checkpoint/file/config cannot be used"; anything else is a bug and keeps
# its traceback. OSError covers FileNotFoundError and transformers' "can't load tokenizer".
INPUT_ERRORS = (CheckpointError, ConfigError, OSError)
DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# An export may also be float16: the dtype of many HF bases (Llama 2), which a patch or shard reuse must match.
EXPORT_DTYPES: dict[str, Any] = {**DTYPES, "float16": jnp.float16}


def run_cli(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; turn an input error into ``error: <message>`` on stderr and exit code 2."""
    try:
        main(argv)
    except INPUT_ERRORS as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def source_dtype(ckpt: Checkpoint) -> np.dtype:
    """The dtype a checkpoint stores its weights in: its embedding's (GGUF: float32). Not its first
    tensor's: old Llama 2 files list float32 ``rotary_emb.inv_freq`` buffers before float16 weights."""
    return np.dtype(ckpt.tensors.read("model.embed_tokens.weight").dtype)


def read_params(ckpt: Checkpoint, dtype: Any, where: str) -> Params:
    """All params of ``ckpt`` in ``dtype``, shape-checked, streamed tensor by tensor onto one device.

    One device on purpose: a conversion needs no parallelism, and a replicated mesh over several
    (CPU) devices would hold one copy of the model per device.
    """
    mesh = make_mesh(devices=jax.local_devices()[:1])
    return params_from_tensors(ckpt.config, ckpt.tensors.read, ckpt.tensors.names(), dtype, mesh, where=where)
