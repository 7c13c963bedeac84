"""experiments/bench on a tiny random llama: the PyTorch reference trains the same weights as
locft-jax (an independent implementation of LocFT-BF), and each benchmark writes well-formed results."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.bench import common, roofline, torch_reference
from experiments.bench import generate as generate_bench
from experiments.run import main
from locft_jax.engine import EditConfig, edit
from locft_jax.loading import load_model
from tests.tiny_models import hf_config

LAYER = 2  # of the tiny model's 4


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(tiny_llama_dir, mesh=common.single_device_mesh())


def test_torch_reference_trains_the_same_weights(tiny, tiny_llama_dir):
    """20 edits in batches of 8 (a short last batch), 3 epochs of Adam: float32 weights ≤ 1e-5 apart."""
    requests = common.country_requests(20)
    config = EditConfig(layers=(LAYER,), lr=5e-4, epochs=3, batch_size=8, skip_step_loss=0.0, early_stop_loss=0.0)
    ours = edit(tiny, requests, config, mesh=common.single_device_mesh())
    ref = torch_reference.train(
        torch_reference.load_torch_model(tiny_llama_dir), tiny.tokenizer, requests, LAYER,
        epochs=3, batch_size=8, lr=5e-4,
    )
    weight = np.asarray(next(iter(ours.trainable.values())))
    base = np.asarray(tiny.params["model"]["layers"][LAYER]["mlp"]["down_proj"]["weight"])
    assert np.abs(weight - base).max() > 1e-3  # it trained
    np.testing.assert_allclose(weight, ref.weight, atol=1e-5, rtol=0)
    np.testing.assert_allclose([e["loss"] for e in ours.log], ref.losses, rtol=1e-5)


def test_speed_writes_results_with_matching_weights(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "speed"
    argv = ["bench", "speed", "--model", str(tiny_llama_dir), "--edits", "12", "--epochs", "2", "--repeats", "1",
            "--layer", str(LAYER), "--batch-size", "4", "--torch-threads", "1", "--out", str(out)]
    assert main(argv) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["command"].startswith("python -m experiments.run bench speed")
    assert {"date", "machine", "versions"} <= set(record)
    assert record["versions"]["jax"] and record["machine"]["cpu_count"] >= 1
    results = record["results"]
    assert set(results["medians"]) == {"jax", "jax_no_cache", "torch_threads1"}
    for med in results["medians"].values():
        assert med["edit_epochs_per_s"] > 0 and med["steady_edit_epochs_per_s"] > 0
    assert results["medians"]["jax"]["compile_seconds"] > 0
    assert all(v > 0 for v in results["ratios"].values())
    (check,) = results["weight_checks"]
    assert check["jax_vs_torch_threads1"]["max_abs_diff"] <= 1e-5
    assert check["jax_vs_jax_no_cache"]["max_abs_diff"] <= 1e-5
    assert "| jax |" in capsys.readouterr().out
    assert (out / "table.md").read_text().startswith("12 edits × 2 epochs")


def test_roofline_writes_results(tiny_llama_dir, tmp_path):
    out = tmp_path / "roofline"
    argv = ["bench", "roofline", "--model", str(tiny_llama_dir), "--edits", "8", "--epochs", "2", "--repeats", "1",
            "--layer", str(LAYER), "--batch-size", "4", "--matmul-tries", "1", "--matmul-sizes", "256", "512",
            "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    per = results["flops_per_edit_epoch"]
    assert 0 < per["useful"] <= per["executed"] < per["torch_reference_useful"] * 4
    assert results["matmul_peak"]["peak_flops_per_s"] > 0
    assert 0 < results["fraction_of_peak"]["executed"]
    check = results["xla_cost_analysis_one_batch"]
    if check["xla"] is not None:  # XLA counts element-wise ops too: a bit above the matmul count
        assert check["ours"] <= check["xla"] <= 3 * check["ours"]


def test_scale_runs_each_size_in_its_own_process(tiny_llama_dir, tmp_path):
    out = tmp_path / "scale"
    argv = ["bench", "scale", "--model", str(tiny_llama_dir), "--sizes", "8", "16", "--size-epochs", "2", "1",
            "--layer", str(LAYER), "--batch-size", "4", "--out", str(out)]
    assert main(argv) == 0
    runs = json.loads((out / "results.json").read_text())["results"]["runs"]
    assert [(r["edits"], len(r["epoch_seconds"])) for r in runs] == [(8, 2), (16, 1)]
    small, large = runs
    assert 0 < small["cache_bytes"] < large["cache_bytes"]  # the prefix cache grows with the edits
    assert large["peak_rss_bytes"] >= large["rss_after_load_bytes"] > 0
    assert small["ms_per_edit_epoch_steady"] > 0 and large["ms_per_edit_epoch_steady"] is None  # 1 epoch
    assert all(r["peak_device_bytes"] is None for r in runs)  # CPU reports no device memory
    assert "| 16 | 1 |" in (out / "table.md").read_text()


def test_generate_compares_with_transformers_on_the_scoring_prompts(tiny_llama_dir, tmp_path):
    out = tmp_path / "generate"
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"prompt": "The chemical symbol for gold is", "answer": "Au"}]))
    argv = ["bench", "generate", "--model", str(tiny_llama_dir), "--edits", "3", "--facts", str(facts),
            "--max-new-tokens", "6", "--slots", "4", "--torch-batch", "4", "--repeats", "1", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    # 3 records: each an edit prompt, rephrases and locality prompts; then the fact
    assert results["prompts"] == len(generate_bench.scoring_prompts(3, str(facts))) > 4
    assert results["same_tokens_as_torch"] == 1.0  # float32: transformers' greedy ids, prompt by prompt
    assert results["medians"]["jax"]["tokens"] == results["medians"]["torch"]["tokens"] > 0
    assert "× transformers" in (out / "table.md").read_text()
    empty = tmp_path / "empty"
    assert main([*argv[:argv.index("--edits")], "--edits", "0", "--facts", "", "--out", str(empty)]) == 2
    assert not empty.exists()  # nothing to time: a clear error, no results


def test_edit_flops_counts_by_hand():
    """One layer above the edit (the top one: its MLP and the LM head at the 2 targets only); every term written out."""
    from locft_jax.config import ModelConfig

    cfg = ModelConfig.from_hf_config(hf_config("llama").to_dict())
    d, f, v, t, u = 64, 96, cfg.vocab_size, 10, 2
    q, kv = 4 * 16, 2 * 16
    proj, core, mlp = 2 * t * d * (2 * q + 2 * kv), 4 * t * t * q, 6 * t * d * f
    top_mlp = 6 * u * d * f
    got = roofline.edit_flops(cfg, 2, t, u)
    assert got.forward == 2 * t * f * d + proj + core + top_mlp + 2 * u * d * v
    assert got.backward == 2 * u * d * v + proj + 2 * core + top_mlp + 2 * t * f * d
    full = roofline.edit_flops(cfg, 2, t, u, from_embeddings=True, all_positions=True)
    assert full.forward == 4 * (proj + core + mlp) + 2 * t * d * v


def test_requests_are_distinct_and_reproducible():
    many = common.country_requests(400)
    assert len({(r.prompt, r.target_new) for r in many}) == 400
    assert many[0].prompt == "The capital of China is"
    assert common.synthetic_requests(50, seed=1) == common.synthetic_requests(50, seed=1)
    assert len({r.prompt for r in common.synthetic_requests(1000)}) == 1000


def test_torch_model_from_params_computes_our_logits():
    """The --random-shape path: random params handed to transformers give our logits."""
    import torch

    from locft_jax import model as M
    from locft_jax.config import ModelConfig
    from locft_jax.params import init_random

    shape = dict(common.RANDOM_SHAPES["tiny"], vocab_size=300)
    config = ModelConfig(**shape)
    params = init_random(config, seed=3)
    hf = torch_reference.torch_model_from_params(config, params)
    ids = np.arange(24, dtype=np.int32).reshape(2, 12) * 11 % 300
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(M.logits(params, config, ids)), want, atol=1e-4, rtol=0)


def test_random_shape_speed_with_a_given_tokenizer_matches_torch(tiny_llama_dir, tmp_path):
    """The GPU script's path on CPU: params drawn on the mesh, --tokenizer, the reference filled by DLPack."""
    out = tmp_path / "speed"
    argv = ["bench", "speed", "--random-shape", "tiny", "--tokenizer", str(tiny_llama_dir), "--edits", "12",
            "--epochs", "2", "--repeats", "1", "--layer", str(LAYER), "--batch-size", "4", "--torch-threads", "1",
            "--no-uncached", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert results["model"] == "random:tiny"
    assert set(results["medians"]) == {"jax", "torch_threads1"}
    (check,) = results["weight_checks"]
    assert check["jax_vs_torch_threads1"]["update_max_abs"] > 1e-4  # it trained
    assert check["jax_vs_torch_threads1"]["max_abs_diff"] <= 1e-5
