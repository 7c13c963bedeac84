"""Prompt/target tokenization: the target's tokens as the reference code gets them."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, normalizers, processors
from transformers import PreTrainedTokenizerFast

from locft_jax.engine.dataset import prepare_dataset
from locft_jax.requests import EditRequest
from locft_jax.tokens import encode_pair, encode_pairs
from tests.tiny_models import byte_tokenizer

PIECES = ["<unk>", "<s>", "</s>", "▁The", "▁capital", "▁of", "▁France", "▁is", "▁Paris", "▁", "▁New", "▁York"]


def sentencepiece_style_tokenizer(extra: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """The layout of Llama 2's and Mistral's tokenizer.json: the normalizer prepends "▁" and turns
    every space into "▁", so a text that starts with a space gets a lone "▁" token first. ``extra``:
    pieces preferred over the rest."""
    pieces = [(p, -1.0 if p.startswith("▁") else -5.0) for p in PIECES + list("abcdefghijklmnopqrstuvwxyz")]
    tok = Tokenizer(models.Unigram(pieces + [(p, -0.5) for p in extra], unk_id=0))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_the_target_is_tokenized_in_its_prompt_as_the_reference_does():
    """EasyEdit and the paper's fine-tune.py tokenize prompt + " " + target together: the target is
    "▁Paris", where " Paris" alone is "▁", "▁Paris" (a token the model never sees after a prompt)."""
    tok = sentencepiece_style_tokenizer()
    assert tok.convert_ids_to_tokens(tok(" Paris", add_special_tokens=False)["input_ids"]) == ["▁", "▁Paris"]
    pair = encode_pair(tok, "The capital of France is", "Paris")
    joint = tok("The capital of France is Paris")["input_ids"]
    assert pair.prompt_ids + pair.target_ids == joint + [tok.eos_token_id]
    assert tok.convert_ids_to_tokens(pair.target_ids) == ["▁Paris", "</s>"]
    [scored] = encode_pairs(tok, ["The capital of France is"], [" New York"], add_eos=False)
    assert tok.convert_ids_to_tokens(scored.target_ids) == ["▁New", "▁York"]
    data = prepare_dataset(tok, [EditRequest(prompt="The capital of France is", target_new="Paris")])
    assert data.target_ids[0][: data.tgt_len[0]].tolist() == pair.target_ids  # what training fits


@pytest.mark.parametrize("target", ["Paris", " Paris", "New York", "x"])
def test_byte_level_tokenizers_give_the_same_target_either_way(target):
    """Byte-level BPE (Llama 3, Qwen, SmolLM2) splits at the space: joint and separate agree."""
    tok = byte_tokenizer()
    pair = encode_pair(tok, "The capital of France is", target)
    alone = tok(" " + target.lstrip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert pair.target_ids == alone


def test_a_prompt_whose_tokens_merge_with_the_target_keeps_its_own_tokens():
    """When the joint tokens do not start with the prompt's (a piece spans the boundary), the prompt
    keeps its own tokens and the target is tokenized alone."""
    tok = sentencepiece_style_tokenizer(extra=("▁is▁Paris",))
    assert "▁is▁Paris" in tok.convert_ids_to_tokens(tok("The capital of France is Paris")["input_ids"])
    pair = encode_pair(tok, "The capital of France is", "Paris")
    assert pair.prompt_ids == tok("The capital of France is")["input_ids"]
    assert pair.target_ids == tok(" Paris", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
