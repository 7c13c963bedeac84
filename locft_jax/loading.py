"""``load_model``: a checkpoint on disk → our params on device, streamed tensor by tensor."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from locft_jax import model as model_lib
from locft_jax.config import ModelConfig
from locft_jax.params import Params, tensor_specs, unflatten
from locft_jax.sharding import REPLICATED_RULES, make_mesh, spec_for


@dataclasses.dataclass
class Model:
    """A loaded model: ``config``, ``params`` (HF-named pytree), ``tokenizer`` (HF tokenizer)."""

    config: ModelConfig
    params: Params
    tokenizer: Any
    source: str = ""

    def logits(self, input_ids: Any, attention_mask: Any | None = None) -> jax.Array:
        """Float32 logits ``[B, T, V]`` for int ``input_ids [B, T]`` (left padding via the mask)."""
        ids = jnp.asarray(input_ids, dtype=jnp.int32)
        mask = jnp.ones_like(ids, dtype=bool) if attention_mask is None else jnp.asarray(attention_mask, dtype=bool)
        return _jit_logits(self.params, self.config, ids, mask)

    def with_params(self, params: Params) -> Model:
        return dataclasses.replace(self, params=params)


@jax.jit(static_argnums=1)
def _jit_logits(params: Params, config: ModelConfig, ids: jax.Array, mask: jax.Array) -> jax.Array:
    return model_lib.logits(params, config, ids, mask)


def params_from_tensors(
    config: ModelConfig,
    read: Any,
    names: list[str],
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    rules: Any = REPLICATED_RULES,
    where: str = "checkpoint",
) -> Params:
    """Build params from a ``read(name) -> np.ndarray`` source, one tensor at a time.

    Each tensor goes straight to its device shards (``make_array_from_callback`` reads only the
    slice each device needs), so a host never holds more than one tensor beyond the memory map.
    Shapes are checked against the config; a tied checkpoint's duplicate ``lm_head`` is dropped
    after checking it equals the embedding.
    """
    from convert.errors import CheckpointError

    mesh = mesh or make_mesh()
    specs = tensor_specs(config)
    available = set(names)
    missing = [name for name in specs if name not in available]
    if missing:
        raise CheckpointError(f"{where}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(available - set(specs) - _ignored_extras(config))
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensors {unexpected[:5]} for a {config.model_type} config")
    if config.tie_word_embeddings and "lm_head.weight" in available:
        if not np.array_equal(read("lm_head.weight"), read("model.embed_tokens.weight")):
            raise CheckpointError(f"{where}: config ties embeddings but lm_head.weight differs from embed_tokens")
    flat = {}
    for name, spec in specs.items():
        host = read(name)
        if tuple(host.shape) != spec.shape:
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {tuple(host.shape)}, config expects {spec.shape}"
            )
        if not jnp.issubdtype(host.dtype, jnp.floating):  # e.g. int8 weights of a quantized checkpoint
            raise CheckpointError(
                f"{where}: tensor {name!r} is {host.dtype}; the model needs floating-point weights "
                "(a quantized checkpoint? use the unquantized model)"
            )
        sharding = jax.sharding.NamedSharding(mesh, spec_for(spec.shape, spec.axes, mesh, rules))
        flat[name] = jax.make_array_from_callback(
            spec.shape, sharding, lambda index, host=host: np.asarray(host[index]).astype(dtype)
        )
    return unflatten(flat, config)


def _ignored_extras(config: ModelConfig) -> set[str]:
    # A tied checkpoint may carry lm_head anyway (checked equal above); rotary buffers are derived.
    extras = {"lm_head.weight"} if config.tie_word_embeddings else set()
    return extras | {f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(config.num_hidden_layers)}


def load_model(
    path: str | Path,
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    rules: Any = REPLICATED_RULES,
) -> Model:
    """Load an HF model directory, a ``.gguf`` file, or a ``convert.from_hf`` checkpoint (or a hub
    name ``org/model`` already in the local Hugging Face cache: nothing is downloaded).

    ``dtype`` is the params/compute dtype (float32 or bfloat16); logits are always float32.
    """
    from convert.sources import open_checkpoint

    ckpt = open_checkpoint(path)
    tokenizer = ckpt.load_tokenizer()  # before the weights: a missing tokenizer fails in seconds, not minutes
    params = params_from_tensors(
        ckpt.config, ckpt.tensors.read, ckpt.tensors.names(), dtype, mesh, rules, where=str(path)
    )
    return Model(ckpt.config, params, tokenizer, source=str(path))
