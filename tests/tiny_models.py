"""Tiny random transformers models (one per family) with a byte-level tokenizer, built offline."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

FAMILIES = ("llama", "llama3-tied", "mistral", "qwen2", "qwen3")
# Rarer layouts, tested on their own: llama with biases on q/k/v/o and the MLP, qwen3 with attention biases.
BIASED_FAMILIES = ("llama-bias", "qwen3-bias")

_COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 bytes + 3 specials): real text in, no network, tiny vocab."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )


def hf_config(family: str) -> transformers.PretrainedConfig:
    vocab = len(byte_tokenizer())
    if family == "llama":
        return transformers.LlamaConfig(vocab_size=vocab, rope_theta=10000.0, **_COMMON)
    if family == "llama3-tied":
        scaling = dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16, rope_theta=500000.0,
        )
        return transformers.LlamaConfig(vocab_size=vocab, rope_parameters=scaling, tie_word_embeddings=True, **_COMMON)
    if family == "mistral":
        return transformers.MistralConfig(vocab_size=vocab, sliding_window=None, **_COMMON)
    if family == "qwen2":
        return transformers.Qwen2Config(vocab_size=vocab, tie_word_embeddings=False, **_COMMON)
    if family == "qwen3":
        return transformers.Qwen3Config(vocab_size=vocab, head_dim=24, tie_word_embeddings=False, **_COMMON)
    if family == "llama-bias":
        return transformers.LlamaConfig(vocab_size=vocab, attention_bias=True, mlp_bias=True, **_COMMON)
    if family == "qwen3-bias":
        return transformers.Qwen3Config(vocab_size=vocab, attention_bias=True, tie_word_embeddings=False, **_COMMON)
    raise ValueError(family)


def build_tiny_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A float32 random model; biases and norm weights randomised so every term is exercised."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def save_tiny_model(family: str, out: Path, seed: int = 0) -> Path:
    build_tiny_model(family, seed).save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out
