"""The params pytree: HF tensor names, shapes and logical axes in one table.

``params["model"]["layers"][i]["mlp"]["down_proj"]["weight"]`` is HF's
``model.layers.{i}.mlp.down_proj.weight``, with the same ``[out, in]`` layout.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from locft_jax.config import ModelConfig

Params = dict[str, Any]


class TensorSpec(NamedTuple):
    """Shape and logical axis names of one weight (names mapped to mesh axes by ``sharding``)."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]


def layer_specs(config: ModelConfig) -> dict[str, TensorSpec]:
    """Weights of one decoder layer, keyed by their name below ``model.layers.{i}.``."""
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    specs = {
        "input_layernorm.weight": TensorSpec((d,), ("norm",)),
        "self_attn.q_proj.weight": TensorSpec((q, d), ("heads", "embed")),
        "self_attn.k_proj.weight": TensorSpec((kv, d), ("kv_heads", "embed")),
        "self_attn.v_proj.weight": TensorSpec((kv, d), ("kv_heads", "embed")),
        "self_attn.o_proj.weight": TensorSpec((d, q), ("embed", "heads")),
        "post_attention_layernorm.weight": TensorSpec((d,), ("norm",)),
        "mlp.gate_proj.weight": TensorSpec((f, d), ("mlp", "embed")),
        "mlp.up_proj.weight": TensorSpec((f, d), ("mlp", "embed")),
        "mlp.down_proj.weight": TensorSpec((d, f), ("embed", "mlp")),
    }
    if config.attention_bias:
        specs["self_attn.q_proj.bias"] = TensorSpec((q,), ("heads",))
        specs["self_attn.k_proj.bias"] = TensorSpec((kv,), ("kv_heads",))
        specs["self_attn.v_proj.bias"] = TensorSpec((kv,), ("kv_heads",))
    if config.o_proj_bias:
        specs["self_attn.o_proj.bias"] = TensorSpec((d,), ("embed",))
    if config.mlp_bias:
        specs["mlp.gate_proj.bias"] = TensorSpec((f,), ("mlp",))
        specs["mlp.up_proj.bias"] = TensorSpec((f,), ("mlp",))
        specs["mlp.down_proj.bias"] = TensorSpec((d,), ("embed",))
    if config.qk_norm:
        specs["self_attn.q_norm.weight"] = TensorSpec((hd,), ("norm",))
        specs["self_attn.k_norm.weight"] = TensorSpec((hd,), ("norm",))
    return specs


def tensor_specs(config: ModelConfig) -> dict[str, TensorSpec]:
    """Every weight of the model by its HF name, in checkpoint order."""
    d, v = config.hidden_size, config.vocab_size
    specs = {"model.embed_tokens.weight": TensorSpec((v, d), ("vocab", "embed"))}
    for i in range(config.num_hidden_layers):
        for name, spec in layer_specs(config).items():
            specs[f"model.layers.{i}.{name}"] = spec
    specs["model.norm.weight"] = TensorSpec((d,), ("norm",))
    if not config.tie_word_embeddings:
        specs["lm_head.weight"] = TensorSpec((v, d), ("vocab", "embed"))
    return specs


def name_path(name: str) -> list[str | int]:
    """``"model.layers.3.mlp"`` → ``["model", "layers", 3, "mlp"]`` (list indices as ints)."""
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def get_leaf(tree: Params, name: str) -> Any:
    """The tensor named ``name`` in a nested params tree."""
    node: Any = tree
    for key in name_path(name):
        node = node[key]
    return node


def unflatten(flat: Mapping[str, Any], config: ModelConfig) -> Params:
    """``{hf_name: array}`` → nested params (layers as a list). Names must match ``tensor_specs``."""
    tree: Params = {"model": {"layers": [{} for _ in range(config.num_hidden_layers)]}}
    for name, value in flat.items():
        node: Any = tree
        *parents, leaf = name_path(name)
        for key in parents:
            if isinstance(key, int):
                node = node[key]
            else:
                node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def flatten(params: Params) -> dict[str, Any]:
    """Nested params → ``{hf_name: array}``."""
    return dict(iter_named(params))


def iter_named(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from iter_named(value, f"{prefix}{key}.")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from iter_named(value, f"{prefix}{i}.")
    else:
        yield prefix[:-1], tree


def logical_axes(config: ModelConfig) -> Params:
    """The params-shaped pytree of logical axis tuples (leaves are tuples of str)."""
    return unflatten({name: _AxesLeaf(spec.axes) for name, spec in tensor_specs(config).items()}, config)


class _AxesLeaf(tuple):
    """A tuple that ``jax.tree`` treats as a leaf once passed through ``is_axes_leaf``."""


def is_axes_leaf(x: Any) -> bool:
    return isinstance(x, _AxesLeaf)


def init_random(
    config: ModelConfig, seed: int = 0, dtype: Any = jnp.float32, scale: float = 0.02, shardings: Params | None = None
) -> Params:
    """Random params with the right shapes (norm weights ~1): for tests and timing on big shapes.

    Drawn on the device (``jax.random``, one key per tensor), so an 8B shape takes seconds, not
    minutes of host RNG; ``shardings`` (a params-shaped pytree, e.g. ``sharding.param_shardings``)
    lays each tensor out where it is drawn, so no device ever holds more than its share.
    """
    flat_shardings = flatten(shardings) if shardings is not None else {}
    keys = jax.random.split(jax.random.key(seed), len(tensor_specs(config)))
    flat = {}
    for key, (name, spec) in zip(keys, tensor_specs(config).items(), strict=True):
        mean, std = (1.0, 0.1) if name.endswith("norm.weight") else (0.0, scale)
        draw = jax.jit(_normal, static_argnums=(1, 2, 3, 4), out_shardings=flat_shardings.get(name))
        flat[name] = draw(key, spec.shape, jnp.dtype(dtype), mean, std)
    return unflatten(flat, config)


def _normal(key: jax.Array, shape: tuple[int, ...], dtype: Any, mean: float, std: float) -> jax.Array:
    return (mean + std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def cast(params: Params, dtype: Any) -> Params:
    return jax.tree.map(lambda x: x.astype(dtype), params)


def count(params: Params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
