"""Tensor parallelism on shapes the model axis does not divide evenly (as real models have them).

Real checkpoints split mid-head: Qwen2.5-7B's 28 query / 4 KV heads of 128 put 3.5 query heads and
half a KV head on each of 8 devices, since the rules split the flattened ``heads * head_dim`` rows.
A flattened dim that does not divide stays replicated (``sharding.spec_for``). Either way the
numbers must be one device's.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from convert.to_hf import export_hf
from locft_jax import load_model
from locft_jax.engine import EditConfig, edit
from locft_jax.generate import eos_ids, generate_ids, stop_token_mask
from locft_jax.params import flatten, tensor_specs, unflatten
from locft_jax.sharding import REPLICATED_RULES, TENSOR_PARALLEL_RULES, make_mesh, param_shardings
from locft_jax.tokens import encode_prompt
from tests.test_engine import ONE_DEVICE, REQUESTS
from tests.tiny_models import byte_tokenizer


def _awkward_qwen3(out):
    """Qwen3 (q/k norms): 7 query heads and 1 KV head of 8 (q rows 56, kv rows 8),
    hidden 40 (not heads * head_dim), MLP 148 (divides by 4, not 8), vocab 262 (by 2, not 4)."""
    config = transformers.Qwen3Config(
        vocab_size=262, hidden_size=40, intermediate_size=148, num_hidden_layers=1, num_attention_heads=7,
        num_key_value_heads=1, head_dim=8, tie_word_embeddings=False,
        max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


def _run(path, mesh, rules, out):
    """Logits, an edit of every tensor of the layer, greedy tokens of the edited model, and exports."""
    model = load_model(path, mesh=mesh, rules=rules)
    tok = model.tokenizer
    prompts = [r.prompt for r in REQUESTS[:4]]
    batch = tok(prompts, padding=True, return_tensors="np")
    logits = np.asarray(model.logits(batch["input_ids"], batch["attention_mask"]))
    cfg = EditConfig(layers=(0,), module="layer", lr=1e-3, epochs=2, batch_size=8, skip_step_loss=0.0,
                     early_stop_loss=0.0)
    result = edit(model, REQUESTS[:4], cfg, mesh=mesh)
    stop = stop_token_mask(model.config.vocab_size, eos_ids(model.config, tok), tok, ())
    tokens = generate_ids(result.params, model.config, [encode_prompt(tok, p) for p in prompts], stop,
                          max_new_tokens=8)
    export_hf(model.params, model.config, tok, out / "base")
    export_hf(result.params, model.config, tok, out / "edited")
    edited = {k: np.asarray(v) for k, v in flatten(result.params).items()}
    assert {k: v.tobytes() for k, v in load_file(str(out / "edited" / "model.safetensors")).items()} == {
        k: v.tobytes() for k, v in edited.items()
    }, "the export of a sharded edit is its params"
    trained = {k: np.asarray(v) for k, v in result.trainable.items()}
    return model, logits, trained, tokens, (out / "base" / "model.safetensors").read_bytes()


def test_model_parallel_8_on_uneven_heads_mlp_vocab_matches_one_device(tmp_path):
    """``model_parallel=8``: q rows split mid-head (7 heads, 7 rows a device), the one KV head in
    eighths, the MLP (148) and vocab (262) replicated. Logits, trained weights, greedy tokens and
    the exported checkpoint are one device's. (2 x 4 data x model: tests/test_engine.py.)"""
    assert len(jax.devices()) == 8, "tests run with 8 simulated CPU devices"
    path = _awkward_qwen3(tmp_path / "model")
    _, logits, trained, tokens, exported = _run(path, ONE_DEVICE, REPLICATED_RULES, tmp_path / "one")
    model, mp_logits, mp_trained, mp_tokens, mp_exported = _run(
        path, make_mesh(8), TENSOR_PARALLEL_RULES, tmp_path / "mp8"
    )
    specs = {k: tuple(v.sharding.spec) for k, v in flatten(model.params).items()}
    assert specs["model.layers.0.self_attn.q_proj.weight"] == ("model", None)
    assert specs["model.layers.0.self_attn.k_proj.weight"] == ("model", None)
    assert specs["model.layers.0.self_attn.o_proj.weight"] == (None, "model")
    assert specs["model.layers.0.mlp.down_proj.weight"] == (None, None)
    assert specs["lm_head.weight"] == specs["model.embed_tokens.weight"] == (None, None)
    np.testing.assert_allclose(mp_logits, logits, atol=1e-5)
    assert mp_trained.keys() == trained.keys()
    for name in trained:
        np.testing.assert_allclose(mp_trained[name], trained[name], atol=1e-5, err_msg=name)
    assert mp_tokens == tokens
    assert mp_exported == exported


def test_weights_a_rule_cannot_split_are_named_in_a_warning(tmp_path):
    """vocab 262 and MLP 148 do not divide by 8: the user is told which stay whole, and how large."""
    config = load_model(_awkward_qwen3(tmp_path / "model"), mesh=ONE_DEVICE).config
    shapes = {n: jax.ShapeDtypeStruct(s.shape, np.float32) for n, s in tensor_specs(config).items()}
    shapes = unflatten(shapes, config)
    with pytest.warns(UserWarning, match=r"vocab width 262 \(0\.1 MiB\), mlp width 148 \(0\.1 MiB\): not divisible"):
        param_shardings(config, shapes, make_mesh(8), TENSOR_PARALLEL_RULES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        param_shardings(config, shapes, make_mesh(2), TENSOR_PARALLEL_RULES)  # 262 and 148 divide by 2
        param_shardings(config, shapes, make_mesh(8), REPLICATED_RULES)
