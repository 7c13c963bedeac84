"""Read a llama.cpp GGUF file as HF-named, HF-layout float32 tensors plus an HF config.

Tensors are dequantized lazily, one per ``read(name)`` (``gguf.quants.dequantize``), so a host
holds at most one dequantized tensor beyond the memory-mapped file. llama.cpp stores the q/k
projections of llama-architecture models in its interleaved RoPE layout; ``read`` undoes that,
so the params use HF's half-split layout like every other source. The config dict reproduces the
one transformers builds for ``from_pretrained(dir, gguf_file=name)``, so an export of these
weights loads in transformers as the same model. The tokenizer comes from transformers' own
GGUF tokenizer conversion (which needs torch installed, as transformers' GGUF support does), done
once per file and then read from disk (``convert.tokenizer_cache``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from convert.errors import CheckpointError
from convert.sources import Checkpoint
from locft_jax.config import ConfigError, ModelConfig

# GGUF architectures we read, and the transformers model_type / class each becomes.
SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_ARCHITECTURES_BY_TYPE = {**SUPPORTED_ARCHITECTURES, "mistral": "MistralForCausalLM"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str | None:
    """The HF name of a llama.cpp tensor name, or None if it has no HF counterpart we support."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_PATTERN.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    return None


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs → HF half-split layout).

    llama.cpp's ``permute`` is ``reshape(n_head, 2, hd//2, ...).swapaxes(1, 2)``; this is its
    inverse, the same as transformers' ``LlamaTensorProcessor._reverse_permute_weights``.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFTensors:
    """The weights of a GGUF file under HF names, dequantized to float32 one at a time."""

    def __init__(self, path: Path, reader: Any, permute_qk: bool, n_head: int, n_kv_head: int):
        self.path = path
        self._permute_qk = permute_qk
        self._heads = {"self_attn.q_proj": n_head, "self_attn.k_proj": n_kv_head}
        self._tensors = {}
        for tensor in reader.tensors:
            name = hf_name(tensor.name)
            if name is None:
                raise CheckpointError(f"{path}: GGUF tensor {tensor.name!r} has no supported HF counterpart")
            self._tensors[name] = tensor

    def names(self) -> list[str]:
        return list(self._tensors)

    def read(self, name: str) -> np.ndarray:
        """The tensor as float32 ``[out, in]`` (HF layout), dequantized now."""
        from gguf.quants import dequantize

        if name not in self._tensors:
            raise CheckpointError(f"{self.path}: checkpoint has no tensor {name!r}")
        tensor = self._tensors[name]
        try:
            w = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        except (NotImplementedError, ValueError) as err:
            raise CheckpointError(
                f"{self.path}: cannot dequantize {tensor.name!r} ({tensor.tensor_type.name}): {err}"
            ) from None
        # GGML lists dims innermost first; numpy's row-major shape is the reverse, i.e. HF's [out, in].
        expected = tuple(int(d) for d in reversed(tensor.shape))
        if w.shape != expected:
            raise CheckpointError(
                f"{self.path}: tensor {tensor.name!r} dequantized to {w.shape}, header says {expected}"
            )
        module = name.rsplit(".", 1)[0].split(".", 3)[-1]
        if self._permute_qk and module in self._heads:
            w = unpermute_rope(w, self._heads[module])
        return w


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_hf_config(reader: Any, path: Path) -> dict[str, Any]:
    """The HF ``config.json`` dict transformers derives from this GGUF's metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    # transformers turns a llama GGUF into a mistral model only when general.name is "mistral".
    model_type = "mistral" if arch == "llama" and _field(reader, "general.name") == "mistral" else arch

    def meta(key: str, default: Any = None) -> Any:
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    tensor_names = {t.name for t in reader.tensors}
    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    vocab = _field(reader, f"{arch}.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    if not vocab:
        raise CheckpointError(f"{path}: GGUF metadata gives no vocab size")
    head_dim = _field(reader, f"{arch}.attention.key_length") or _field(reader, f"{arch}.rope.dimension_count")
    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURES_BY_TYPE[model_type]],
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": int(head_dim or hidden // heads),
        "hidden_act": "silu",
        "max_position_embeddings": int(meta("context_length")),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        # llama.cpp drops output.weight when the model ties it to the embedding.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": any(name.endswith("attn_q.bias") for name in tensor_names),
        "mlp_bias": arch == "llama" and any(name.endswith("ffn_down.bias") for name in tensor_names),
    }
    if model_type == "mistral":
        config["sliding_window"] = None  # our decoder has full attention; say so explicitly
    for key in ("bos", "eos", "unknown", "padding"):
        value = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if value is not None:
            config[{"unknown": "unk", "padding": "pad"}.get(key, key) + "_token_id"] = int(value)
    return config


def open_gguf(path: str | Path) -> Checkpoint:
    """A GGUF file as a :class:`Checkpoint`: HF config, lazy HF-named tensors, GGUF tokenizer."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (ValueError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable GGUF file ({err})") from None
    if "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise CheckpointError(f"{path}: GGUF rope_freqs (llama3 rope scaling) is not supported; convert from HF")
    hf = gguf_hf_config(reader, path)
    try:
        config = ModelConfig.from_hf_config(hf)
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None
    tensors = GGUFTensors(
        path,
        reader,
        # llama.cpp permutes q/k only in its llama converter; qwen GGUFs keep the HF (neox) layout.
        permute_qk=hf["model_type"] in ("llama", "mistral"),
        n_head=config.num_attention_heads,
        n_kv_head=config.num_key_value_heads,
    )
    return Checkpoint(config, tensors, path.parent, {"gguf_file": path.name})
