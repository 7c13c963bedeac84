"""Greedy generation with a KV cache equals transformers' ``generate`` token for token."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import jax
import numpy as np
import pytest
import torch
import transformers

from locft_jax import generate, load_model
from locft_jax.generate import eos_ids, generate_greedy, generate_ids, stop_token_mask, truncate_at_stops

PROMPTS = [
    "The capital of France is",
    "Hi",
    "A longer prompt about the Eiffel tower, in Paris, which is tall.",
    "x",
    "Once upon a time there",
    "Water boils at",
]

SMOL_PROMPTS = [
    "The capital of France is",
    "The Eiffel Tower is located in",
    "Water is made of",
    "The largest planet in the solar system is",
    "Albert Einstein was born in",
    "The author of Hamlet is",
    "The chemical symbol for gold is",
    "The tallest mountain on Earth is",
    "Python is a programming language created by",
    "The currency of Japan is the",
    "Q: What is the capital of Italy?\nA:",
    "The first man on the moon was",
    "Photosynthesis converts sunlight into",
    "The Great Wall is in",
    "Mozart was a composer from",
    "The speed of light is about",
    "Tokyo is the capital of",
    "The Amazon river flows through",
    "The inventor of the telephone was",
    "Hi",
]


def hf_greedy(hf_model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """transformers' batched greedy continuation ids (left padding), cut after the first EOS."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = hf_model.generate(
            **enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
        )
    rows = out[:, enc["input_ids"].shape[1] :].tolist()
    eos = tokenizer.eos_token_id
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def ours_greedy(m: Any, prompts: list[str], max_new_tokens: int, batch_size: int = 4) -> list[list[int]]:
    ids = [m.tokenizer(p)["input_ids"] for p in prompts]
    stop = stop_token_mask(m.config.vocab_size, eos_ids(m.config, m.tokenizer))
    pad = m.tokenizer.pad_token_id
    return generate_ids(m.params, m.config, ids, stop, max_new_tokens, batch_size, pad_id=pad)


def test_greedy_ids_match_transformers_with_left_padding(tiny_model_dir):
    ours = load_model(tiny_model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    # batch_size 4 over 6 prompts: a full batch and a padded one, both left-padded.
    got = ours_greedy(ours, PROMPTS, max_new_tokens=12)
    assert got == hf_greedy(hf, ours.tokenizer, PROMPTS, 12)


def test_stop_strings_cut_text_exactly_as_after_full_generation(tiny_llama_dir):
    ours = load_model(tiny_llama_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    want_ids = hf_greedy(hf, ours.tokenizer, PROMPTS, 16)
    full = [ours.tokenizer.decode(t, skip_special_tokens=True) for t in want_ids]
    # A character the random model emits mid-answer plays the role of "." (rare in its output).
    char = Counter(ch for text in full for ch in text[2:8]).most_common(1)[0][0]
    stops = (char, "\n")
    got = generate_greedy(ours.params, ours.config, ours.tokenizer, PROMPTS, 16, batch_size=4, stop_at=stops)
    want = [truncate_at_stops(t, stops) for t in full]
    assert got == want
    assert any(len(w) < len(f) for w, f in zip(want, full, strict=True)), "the stop string must cut something"


def test_stop_token_ends_a_row_and_others_go_on(tiny_llama_dir):
    ours = load_model(tiny_llama_dir)
    full = ours_greedy(ours, PROMPTS, 10)
    stop_id = full[0][3]
    stop = stop_token_mask(ours.config.vocab_size, [stop_id])
    ids = [ours.tokenizer(p)["input_ids"] for p in PROMPTS]
    got = generate_ids(ours.params, ours.config, ids, stop, 10, batch_size=4)
    for g, f in zip(got, full, strict=True):
        assert g == (f[: f.index(stop_id) + 1] if stop_id in f else f)


def test_compiles_per_prompt_bucket_not_per_batch(tiny_llama_dir):
    """Calls with the same longest prompt compile the decode loop once and the prefill at most once
    per prompt bucket, however the prompts fall into batches and calls."""
    ours = load_model(tiny_llama_dir)
    buckets = {generate.bucket(len(ours.tokenizer(p)["input_ids"])) for p in PROMPTS}
    before = generate.compile_count()
    for chunk in (PROMPTS * 3, PROMPTS[::-1], PROMPTS * 2, PROMPTS[:2] + PROMPTS[2:] * 3):
        ours_greedy(ours, chunk, max_new_tokens=5)  # 4 slots (rounded up to the data axis), many refills
    assert generate.compile_count() - before <= len(buckets) + 1


def test_continuous_batching_gives_each_prompt_its_own_answer(tiny_llama_dir):
    """Slots refilled mid-run (stop tokens end rows early) give the answers of one-prompt calls."""
    ours = load_model(tiny_llama_dir)
    full = ours_greedy(ours, PROMPTS, 10)
    stop_ids = [full[0][2], full[1][6]]
    stop = stop_token_mask(ours.config.vocab_size, stop_ids)
    ids = [ours.tokenizer(p)["input_ids"] for p in PROMPTS * 4]
    got = generate_ids(ours.params, ours.config, ids, stop, 10, batch_size=8)
    alone = [generate_ids(ours.params, ours.config, [i], stop, 10, batch_size=1)[0] for i in ids[: len(PROMPTS)]]
    assert got == alone * 4
    assert len({len(g) for g in got}) > 2, "rows must stop at different steps"


def test_slots_are_split_over_the_data_axis_with_the_same_answers(tiny_llama_dir):
    """On the 8 simulated devices' mesh each device decodes its own slots (rounded up to 8); the
    answers equal a one-device run's, and a run from numpy params'."""
    from jax.sharding import PartitionSpec

    from locft_jax.sharding import rows_over_data
    from tests.test_engine import ONE_DEVICE

    eight, one = load_model(tiny_llama_dir), load_model(tiny_llama_dir, mesh=ONE_DEVICE)
    assert jax.device_count() == 8
    slots, sharding, data = rows_over_data(eight.params, 4)
    assert (slots, data, sharding.spec) == (8, 8, PartitionSpec("data"))
    assert rows_over_data(one.params, 4)[0::2] == (4, 1)
    assert ours_greedy(eight, PROMPTS * 2, 8) == ours_greedy(one, PROMPTS * 2, 8)
    host = jax.tree.map(np.asarray, one.params)  # numpy params: on JAX's default device
    assert rows_over_data(host, 4) == (4, None, 1)
    ids = [one.tokenizer(p)["input_ids"] for p in PROMPTS]
    stop = stop_token_mask(one.config.vocab_size, eos_ids(one.config, one.tokenizer))
    assert generate_ids(host, one.config, ids, stop, 8, 4) == ours_greedy(one, PROMPTS, 8)


def test_bfloat16_params_generate_with_a_bfloat16_cache(tiny_llama_dir):
    f32, bf16 = load_model(tiny_llama_dir), load_model(tiny_llama_dir, dtype=jax.numpy.bfloat16)
    got = ours_greedy(bf16, PROMPTS[:3], max_new_tokens=4)
    assert [len(g) for g in got] == [4, 4, 4]
    # bf16 rounding may flip a near-tie, but most first tokens agree with float32.
    assert sum(g[0] == w[0] for g, w in zip(got, ours_greedy(f32, PROMPTS[:3], 4), strict=True)) >= 2


def test_truncate_at_stops():
    assert truncate_at_stops(" Paris. It is", (".", "\n")) == " Paris"
    assert truncate_at_stops(" Paris\nThe", (".", "\n")) == " Paris"
    assert truncate_at_stops(" Paris", (".", "\n")) == " Paris"
    assert truncate_at_stops(" a\nb.c", (".", "\n")) == " a"
    assert truncate_at_stops("abc", ()) == "abc"


def test_zero_new_tokens_and_empty_input(tiny_llama_dir):
    ours = load_model(tiny_llama_dir)
    args = ours.params, ours.config, ours.tokenizer
    assert generate_greedy(*args, PROMPTS[:2], max_new_tokens=0) == ["", ""]
    assert generate_greedy(*args, []) == []


@pytest.mark.parametrize("batch_size", [0, -1])
def test_a_batch_size_below_one_is_a_clear_error(tiny_llama_dir, batch_size):
    """No slots to decode in: an error naming batch_size (was: ``max() arg is an empty sequence``,
    or numpy's ``negative dimensions are not allowed``)."""
    ours = load_model(tiny_llama_dir)
    with pytest.raises(ValueError, match="batch_size"):
        ours_greedy(ours, PROMPTS[:2], max_new_tokens=4, batch_size=batch_size)


# --- SmolLM2-135M-Instruct, the embedded real model -------------------------------------------


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2, smollm2_hf):
    got = ours_greedy(smollm2, SMOL_PROMPTS, max_new_tokens=32, batch_size=8)
    want = hf_greedy(smollm2_hf, smollm2.tokenizer, SMOL_PROMPTS, 32)
    assert sum(g == w for g, w in zip(got, want, strict=True)) == len(SMOL_PROMPTS), [
        (p, smollm2.tokenizer.decode(g), smollm2.tokenizer.decode(w))
        for p, g, w in zip(SMOL_PROMPTS, got, want, strict=True)
        if g != w
    ]
    texts = generate_greedy(smollm2.params, smollm2.config, smollm2.tokenizer, SMOL_PROMPTS, 32, batch_size=8)
    decoded = [smollm2.tokenizer.decode(w, skip_special_tokens=True) for w in want]
    assert texts == [truncate_at_stops(t, (".", "\n")) for t in decoded]
    assert np.mean([len(t) > 0 for t in texts]) > 0.5


def test_generation_stops_at_the_eos_ids_transformers_generate_uses(tiny_llama_dir, tmp_path):
    """config.json may list several EOS ids (Llama 3.1: three), and generation_config.json's list
    (Qwen2.5-Instruct: two) replaces it in transformers' generate; greedy scoring stops where it does."""
    import shutil

    model_dir = shutil.copytree(tiny_llama_dir, tmp_path / "model")
    prompts = PROMPTS[:3]
    plain = ours_greedy(load_model(model_dir), prompts, max_new_tokens=8)
    in_config, in_generation = plain[0][0], plain[1][2]  # tokens answers produce
    assert len({2, in_config, in_generation}) == 3
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "eos_token_id": [2, in_config]}))
    generation = transformers.GenerationConfig(bos_token_id=1, pad_token_id=0, eos_token_id=[2, in_generation])
    generation.save_pretrained(model_dir)

    def hf_ids(model: Any) -> list[list[int]]:
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        model.tokenizer.padding_side = "left"
        enc = model.tokenizer(prompts, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = hf.generate(**enc, do_sample=False, max_new_tokens=8, pad_token_id=0)
        return out[:, enc["input_ids"].shape[1] :].tolist()

    for listed, stops in [((2, in_generation), {2, in_generation}), ((2, in_config), {2, in_config})]:
        ours = load_model(model_dir)
        assert ours.config.eos_token_id == 2 and ours.config.eos_token_ids == listed
        expected = [row[: next((i + 1 for i, t in enumerate(row) if t in stops), len(row))] for row in plain]
        assert expected != plain
        assert ours_greedy(ours, prompts, max_new_tokens=8) == expected
        # transformers: the same ids, then padding
        assert hf_ids(ours) == [e + [0] * (8 - len(e)) for e in expected]
        (model_dir / "generation_config.json").unlink(missing_ok=True)  # then config.json's list applies
