"""Logits parity against transformers on tiny random models of every family (float32)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from convert.to_hf import export_hf
from locft_jax import load_model
from locft_jax import model as model_lib
from locft_jax.config import ConfigError, ModelConfig
from locft_jax.engine import EditConfig, edit
from locft_jax.generate import generate_ids
from locft_jax.params import flatten
from locft_jax.requests import EditRequest
from tests.test_engine import FAST, ONE_DEVICE, REQUESTS, _plain_reference
from tests.tiny_models import BIASED_FAMILIES, byte_tokenizer, hf_config, save_tiny_model

PROMPTS = ["The capital of France is", "Hi", "A longer prompt about the Eiffel tower, in Paris."]


def _batch(tokenizer):
    enc = tokenizer(PROMPTS, padding=True, return_tensors="np")
    return enc["input_ids"], enc["attention_mask"]


def test_logits_match_transformers_with_left_padding(tiny_model_dir):
    ours = load_model(tiny_model_dir)
    ids, mask = _batch(ours.tokenizer)
    assert (mask[:, 0] == 0).any(), "the batch must contain left padding"
    got = np.asarray(ours.logits(ids, mask))

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    positions = np.asarray(model_lib.positions_from_mask(jnp.asarray(mask)))
    with torch.no_grad():
        want = hf(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        ).logits.numpy()
    real = mask.astype(bool)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


def test_left_padding_does_not_change_logits(tiny_llama_dir):
    ours = load_model(tiny_llama_dir)
    ids, mask = _batch(ours.tokenizer)
    batched = np.asarray(ours.logits(ids, mask))
    for row, prompt in enumerate(PROMPTS):
        alone = np.asarray(ours.logits(ours.tokenizer([prompt], return_tensors="np")["input_ids"]))[0]
        np.testing.assert_allclose(batched[row][mask[row].astype(bool)], alone, atol=1e-4)


def test_bfloat16_params_give_float32_logits_close_to_float32(tiny_llama_dir):
    f32 = load_model(tiny_llama_dir)
    bf16 = load_model(tiny_llama_dir, dtype=jnp.bfloat16)
    assert bf16.params["model"]["layers"][0]["mlp"]["down_proj"]["weight"].dtype == jnp.bfloat16
    ids, mask = _batch(f32.tokenizer)
    a, b = np.asarray(f32.logits(ids, mask)), np.asarray(bf16.logits(ids, mask))
    assert b.dtype == np.float32
    real = mask.astype(bool)
    assert np.abs(a[real] - b[real]).max() < 0.1


def test_unsupported_model_type_is_a_clear_error():
    with pytest.raises(ConfigError, match="unsupported model_type 'gpt2'"):
        ModelConfig.from_hf_config({"model_type": "gpt2"})


@pytest.fixture(scope="module", params=BIASED_FAMILIES)
def biased_model_dir(request, tmp_path_factory):
    """llama with biases on q/k/v/o and the MLP; qwen3 with attention biases (o_proj's included)."""
    return save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


def test_biased_layouts_match_transformers_and_train_and_export_every_bias(biased_model_dir, tmp_path):
    test_logits_match_transformers_with_left_padding(biased_model_dir)
    model = load_model(biased_model_dir)
    names = [n for n in flatten(model.params) if n.startswith("model.layers.2.") and n.endswith("bias")]
    assert "model.layers.2.self_attn.o_proj.bias" in names
    cfg = EditConfig(layers=(2,), module="layer", **FAST)
    result = edit(model, REQUESTS[:4], cfg, mesh=ONE_DEVICE)
    assert set(names) <= set(result.trainable)
    base = flatten(model.params)
    for name, value in _plain_reference(model, REQUESTS[:4], cfg, list(result.trainable)).items():
        # float32 sums in another order through 16 Adam steps of lr 5e-3: an entry whose gradient is
        # near zero (k_proj's bias, one entry of qwen3's k_proj) moves by rounding, ~5e-5 either way
        np.testing.assert_allclose(np.asarray(result.trainable[name]), value, atol=1e-4, rtol=0, err_msg=name)
        if name in names:
            assert not np.array_equal(value, np.asarray(base[name])), f"{name} did not train"
    out = export_hf(result.params, model.config, model.tokenizer, tmp_path / "hf")
    ids, mask = _batch(model.tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    positions = np.asarray(model_lib.positions_from_mask(jnp.asarray(mask)))
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(positions)).logits.numpy()
    got = np.asarray(model_lib.logits(result.params, model.config, jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


def test_an_activation_other_than_silu_is_refused():
    hf = hf_config("llama").to_dict() | {"hidden_act": "gelu"}
    with pytest.raises(ConfigError, match="unsupported hidden_act 'gelu'"):
        ModelConfig.from_hf_config(hf)


@pytest.mark.parametrize(
    "fields, window",
    [
        ({"model_type": "mistral"}, 4096),  # transformers' default when config.json has no key
        ({"model_type": "mistral", "sliding_window": None}, None),
        ({"model_type": "mistral", "sliding_window": 32}, 32),
        ({"model_type": "qwen2", "sliding_window": 32}, None),  # use_sliding_window defaults to False
        ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 32, "max_window_layers": 2}, 32),
        ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 32, "max_window_layers": 4}, None),
        ({"model_type": "qwen3", "use_sliding_window": True, "sliding_window": 32,
          "layer_types": ["full_attention"] * 3 + ["sliding_attention"]}, 32),
        ({"model_type": "llama", "sliding_window": 32}, None),
    ],
)
def test_sliding_window_is_read_as_transformers_reads_it(fields, window):
    hf = {k: v for k, v in hf_config(fields["model_type"]).to_dict().items()
          if k not in ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types")}
    assert ModelConfig.from_hf_config(hf | fields).sliding_window == window


def test_spans_past_the_sliding_window_are_refused_and_shorter_ones_match(tmp_path):
    model = transformers.MistralForCausalLM(hf_config("mistral")).eval()
    model.config.sliding_window = 8
    model.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.sliding_window == 8
    ids = ours.tokenizer(["Hi there"], return_tensors="np")["input_ids"]
    with torch.no_grad():
        want = model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours.logits(ids)), want, atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="a batch spans 9 tokens, more than this model's sliding attention window"):
        ours.logits(ours.tokenizer(["Hi there!"], return_tensors="np")["input_ids"])
    with pytest.raises(ConfigError, match="the longest request"):
        edit(ours, [EditRequest("Hi", "there friend")], EditConfig(layers=(1,), **FAST), mesh=ONE_DEVICE)
    with pytest.raises(ConfigError, match="a prompt with its generated tokens"):
        generate_ids(ours.params, ours.config, [list(ids[0])], np.zeros(ours.config.vocab_size, bool), max_new_tokens=8)


@pytest.mark.parametrize(
    "family, rope",
    [
        ("llama", {"rope_type": "linear", "factor": 2.0}),
        ("qwen3", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
        ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8.0,
                   "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False}),
        ("mistral", {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 64}),  # 256 / 64
    ],
)
def test_linear_and_yarn_rope_scaling_match_transformers(family, rope, tmp_path):
    config = hf_config(family)
    config.rope_parameters = {**rope, "rope_theta": 10000.0}
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.rope_scaling_dict["rope_type"] == rope["rope_type"]
    test_logits_match_transformers_with_left_padding(tmp_path)


def test_other_rope_types_are_refused():
    hf = hf_config("llama").to_dict()
    hf["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ConfigError, match="unsupported rope_scaling type 'dynamic'; supported: default, llama3"):
        ModelConfig.from_hf_config(hf)
