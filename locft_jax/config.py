"""Model configuration: one frozen dataclass for every supported decoder family."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class ConfigError(ValueError):
    """A model config that locft-jax cannot run (unknown family, inconsistent sizes, ...)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture of a decoder LLM, enough to run and export it.

    Family differences are fields, not subclasses: q/k/v bias (qwen2; llama and qwen3 with
    ``attention_bias``, which also gives ``o_proj`` a bias), MLP biases (llama's ``mlp_bias``),
    per-head q/k RMSNorm (qwen3), tied embeddings (SmolLM2, small Qwen), llama3 / linear / yarn
    RoPE scaling (Llama 3.1+, long-context Qwen). ``sliding_window``: the smallest attention window
    any layer uses (Mistral v0.1's 4096; Qwen2/3 with ``use_sliding_window``), None when every layer
    attends to all positions; the decoder runs full attention, the same up to that many tokens, and
    refuses longer spans.
    ``hf_config_json`` keeps the original HF config so an export reproduces it exactly.
    ``eos_token_ids``: the ids that end generation, as transformers' ``generate`` takes them:
    ``generation_config.json``'s ``eos_token_id`` when it has one (e.g. Qwen2.5-Instruct's two),
    else ``config.json``'s (an int or a list, e.g. Llama 3.1's three); ``eos_token_id`` is the first
    of ``config.json``'s.
    The dataclass is hashable, so it can be a static argument of ``jax.jit``.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = dataclasses.field(default=(), compare=False)
    hf_config_json: str = dataclasses.field(default="{}", compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def o_proj_bias(self) -> bool:
        """llama's and qwen3's ``attention_bias`` covers the output projection too; qwen2's does not."""
        return self.attention_bias and self.model_type in ("llama", "qwen3")

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
        """Build from a transformers ``config.json`` dict (and ``generation_config.json``'s: its EOS ids)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        activation = hf.get("hidden_act", "silu")
        if activation not in ("silu", "swish"):
            raise ConfigError(f"unsupported hidden_act {activation!r}; supported: silu (SwiGLU)")
        try:
            heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            head_dim = hf.get("head_dim") or hidden // heads
            rope_scaling = _rope_scaling(hf)
            eos = _ids(hf.get("eos_token_id"))
            return cls(
                model_type=model_type,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=int(hf["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(_rope_theta(hf)),
                rope_scaling=tuple(sorted(rope_scaling.items())) if rope_scaling else None,
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                # qwen2 always has q/k/v bias; llama/mistral/qwen3 expose it as attention_bias.
                attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
                mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
                qk_norm=model_type == "qwen3",
                sliding_window=_sliding_window(hf),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=eos[0] if eos else None,
                eos_token_ids=tuple(_ids((generation or {}).get("eos_token_id")) or eos),
                pad_token_id=hf.get("pad_token_id"),
                hf_config_json=json.dumps(hf, sort_keys=True),
            )
        except KeyError as err:
            raise ConfigError(f"config.json lacks required field {err.args[0]!r}") from None

    def to_hf_config(self) -> dict[str, Any]:
        """The HF ``config.json`` dict: the original one if known, else one built from the fields."""
        original = json.loads(self.hf_config_json)
        if original:
            return original
        out: dict[str, Any] = {
            "model_type": self.model_type,
            "architectures": [_ARCHITECTURES[self.model_type]],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type in ("llama", "qwen3"):
            out["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window  # transformers reads a missing key as 4096
        return out


def _ids(value: Any) -> list[int]:
    """A config's token id field (None, an int, or a list of ints) as a list."""
    if value is None:
        return []
    return [int(i) for i in value] if isinstance(value, list) else [int(value)]


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def _sliding_window(hf: dict[str, Any]) -> int | None:
    """The smallest window of any sliding-attention layer, as transformers reads ``config.json``:
    Mistral windows every layer (4096 when the key is absent); Qwen2/3 only with
    ``use_sliding_window``, on the layers ``layer_types`` marks (by default those from
    ``max_window_layers`` up)."""
    model_type = hf.get("model_type")
    if model_type == "mistral":
        window = hf.get("sliding_window", 4096)
    elif model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window", False):
        window = hf.get("sliding_window", 4096)
        layers = int(hf.get("num_hidden_layers", 0))
        types = hf.get("layer_types") or [
            "sliding_attention" if i >= int(hf.get("max_window_layers", 28)) else "full_attention"
            for i in range(layers)
        ]
        if "sliding_attention" not in types:
            window = None
    else:
        window = None
    return None if window is None else int(window)


def _rope_theta(hf: dict[str, Any]) -> float:
    # transformers >= 5 moves rope_theta into rope_parameters.
    params = hf.get("rope_parameters") or {}
    return hf.get("rope_theta") or params.get("rope_theta") or 10000.0


# rope_type → the keys it reads (transformers' ``modeling_rope_utils``); the first ones are required.
_ROPE_KEYS = {
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "linear": (("factor",), ()),
    "yarn": (
        ("original_max_position_embeddings",),
        ("factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    ),
}


def _rope_scaling(hf: dict[str, Any]) -> dict[str, Any] | None:
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or None
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"unsupported partial_rotary_factor {scaling['partial_rotary_factor']}; supported: 1.0")
    if kind == "default":
        return None
    if kind not in _ROPE_KEYS:
        raise ConfigError(f"unsupported rope_scaling type {kind!r}; supported: default, {', '.join(_ROPE_KEYS)}")
    required, optional = _ROPE_KEYS[kind]
    missing = [k for k in required if k not in scaling]
    if missing:
        raise ConfigError(f"{kind} rope_scaling lacks {', '.join(missing)}")
    out = {"rope_type": kind, **{k: scaling[k] for k in required}}
    out.update({k: scaling[k] for k in optional if scaling.get(k) is not None})
    if kind == "yarn" and "factor" not in out:  # as transformers: the context's growth
        out["factor"] = int(hf.get("max_position_embeddings", 4096)) / scaling["original_max_position_embeddings"]
    return out
