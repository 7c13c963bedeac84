"""The named experiments (df-vs-bf, locations, batch-size, lifelong, scaling) on a tiny random
model: each writes its config, a well-formed results table, the report and real plots. Plus the
LoRA baseline and the synthetic-fact generator they share."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from experiments.baselines.lora import LoraConfig, lora_edit
from experiments.run import main
from experiments.sweep import METRICS, synthetic_requests, with_synthetic
from locft_jax import load_model
from locft_jax.augment import retain_requests
from locft_jax.data import load_requests, load_texts
from locft_jax.engine import EditConfig
from locft_jax.evaluate import load_facts, score_targets
from locft_jax.params import flatten

ROOT = Path(__file__).parents[1]
EXPERIMENT_DATA = ROOT / "experiments" / "data"
DATA = EXPERIMENT_DATA / "country_capitals.json"
# The top layer (-1) is edited unless a test says otherwise: the least to compile.
# what every edited row must hold as a finite number (both scoring styles run by default)
FINITE = [*METRICS.keys() - {"locality_tf", "locality_gen", "spill_gen"},
          "perplexity", "seconds", "seconds_per_edit", "train_loss"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(name: str, model_dir: Path, out: Path, *extra: str) -> Path:
    code = main([name, "--model", str(model_dir), "--data", str(DATA), "--epochs", "1", "--layer", "-1",
                 "--out", str(out), *extra])
    assert code == 0
    return out


def _results(out: Path, runs: list[str], id_columns: list[str]) -> list[dict]:
    """results.json has ``runs`` in order with finite metrics; report.md shows the same table."""
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [r["run"] for r in rows] == ["unedited", *runs]
    assert set(id_columns) <= set(results["columns"])
    for row in rows[1:]:
        for col in FINITE:
            assert isinstance(row[col], (int, float)) and math.isfinite(row[col]), (row["run"], col, row[col])
        assert 0.0 <= row["reliability_tf"] <= 1.0 and row["edits"] >= 1
    assert math.isfinite(rows[0]["perplexity"])
    assert len((out / "rows.jsonl").read_text().splitlines()) == len(runs)  # written as they finish
    report = (out / "report.md").read_text()
    header = "| " + " | ".join(results["columns"]) + " |"
    assert header in report
    assert all(f"| {run} |" in report for run in runs)
    config = json.loads((out / "config.json").read_text())
    assert [v["label"] for v in config["variants"]] == runs
    assert all(v["edit_config"]["epochs"] == 1 for v in config["variants"])
    for name in results["plots"]:
        assert f"]({name})" in report
        _check_png(out / name)
    return rows


def _check_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.var() > 0, path


def test_df_vs_bf_table_has_every_method_and_pipeline(tiny_llama_dir, tmp_path):
    out = _run("df-vs-bf", tiny_llama_dir, tmp_path / "r", "--edits", "1", "--lora-rank", "2")
    runs = [f"{m} {p}" for m in ("FT-L", "FT-M", "LoRA") for p in ("df", "bf")]
    rows = _results(out, runs, ["method", "pipeline", "objective"])
    assert [r["objective"] for r in rows[1:]] == ["ft-l", "ft-l", "ft-m", "ft-m", "ft-m", "ft-m"]
    assert all(r["edits"] == 1 and r["epochs_run"] == 1 for r in rows[1:])
    assert (out / "df_vs_bf.png").exists()
    assert json.loads((out / "config.json").read_text())["variants"][-1]["lora"] == {"rank": 2, "alpha": 16.0}


def test_locations_sweep_heatmaps(tiny_llama_dir, tmp_path):
    out = _run("locations", tiny_llama_dir, tmp_path / "r", "--edits", "2", "--layers", "2", "-1",
               "--modules", "mlp_down")
    rows = _results(out, ["L2 mlp_down", "L3 mlp_down"], ["layer", "module"])
    assert [(r["layer"], r["module"]) for r in rows[1:]] == [(2, "mlp_down"), (3, "mlp_down")]
    for key in ("reliability_gen", "reliability_tf", "perplexity"):
        assert (out / f"heatmap_{key}.png").exists()


def test_batch_size_ablation_line_plot(tiny_llama_dir, tmp_path):
    out = _run("batch-size", tiny_llama_dir, tmp_path / "r", "--edits", "2", "--sizes", "1", "2")
    rows = _results(out, ["bs 1", "bs 2"], ["batch_size"])
    assert [r["batch_size"] for r in rows[1:]] == [1, 2]
    assert (out / "batch_size.png").exists()


def test_an_interrupted_sweep_resumes_keeping_its_finished_variants(tiny_llama_dir, tmp_path, capsys):
    out = _run("batch-size", tiny_llama_dir, tmp_path / "r", "--edits", "2", "--sizes", "1")
    first = json.loads((out / "rows.jsonl").read_text().splitlines()[0])
    with open(out / "rows.jsonl", "a") as f:
        f.write('{"run": "bs 2", "trunc')  # a write cut off by the kill
    capsys.readouterr()
    _run("batch-size", tiny_llama_dir, out, "--edits", "2", "--sizes", "1", "2", "--resume")
    assert "bs 1: kept from rows.jsonl" in capsys.readouterr().out
    rows = _results(out, ["bs 1", "bs 2"], ["batch_size"])
    assert first.pop("settings") and rows[1] == first  # rows.jsonl: the table's row and its settings' fingerprint


def test_lifelong_pads_with_synthetic_facts_and_compares_with_depth_first(tiny_llama_dir, tmp_path):
    data = tmp_path / "one.json"
    data.write_text(json.dumps(json.loads(DATA.read_text())[:1]))
    out = tmp_path / "r"
    assert main(["lifelong", "--model", str(tiny_llama_dir), "--data", str(data), "--edits", "2", "--epochs", "1",
                 "--layer", "-1", "--out", str(out)]) == 0
    rows = _results(out, ["LocFT-BF", "FT-M depth-first"], ["pipeline"])
    assert [(r["pipeline"], r["edits"], r["evaluated"]) for r in rows[1:]] == [("bf", 2, 2), ("df", 2, 2)]
    config = json.loads((out / "config.json").read_text())
    assert (config["edits"], config["synthetic_edits"]) == (2, 1)
    assert "1 synthetic facts" in (out / "report.md").read_text()
    assert (out / "reliability_by_position.png").exists()


def test_scaling_volumes_with_an_evaluation_sample(tiny_llama_dir, tmp_path):
    out = _run("scaling", tiny_llama_dir, tmp_path / "r", "--edits", "2", "--sizes", "4", "2",
               "--eval-sample", "3", "--styles", "teacher_forced", "generation")
    rows = _results(out, ["N=2", "N=4"], ["edits"])
    assert [(r["edits"], r["evaluated"]) for r in rows[1:]] == [(2, 2), (4, 3)]
    assert json.loads((out / "config.json").read_text())["synthetic_edits"] == 2
    assert (out / "scaling.png").exists()


def test_synthetic_facts_are_seeded_unique_and_fill_only_the_gap():
    a, b = synthetic_requests(50), synthetic_requests(50)
    assert a == b and synthetic_requests(50, seed=1) != a
    assert len({r.prompt for r in a}) == 50
    assert (a[0].prompt, a[24].prompt) == ("The favourite food of person #0 is", "The profession of person #24 is")
    real = load_requests(DATA, limit=3).requests
    padded, added = with_synthetic(real, 5)
    assert added == 2 and padded[:3] == real and padded[3:] == synthetic_requests(2)
    assert with_synthetic(real, 2) == (real[:2], 0)


def test_lora_reduces_the_loss_and_changes_only_the_targeted_weight(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir))
    requests = load_requests(DATA, limit=4).requests
    config = EditConfig(layers=(2,), module="mlp_down", lr=5e-2, epochs=30, batch_size=4,
                        skip_step_loss=0, early_stop_loss=0)
    result = lora_edit(model, requests, config, LoraConfig(rank=2, alpha=4.0))

    def loss(params) -> float:  # the FT-M loss: mean NLL of the target tokens per request
        scores = score_targets(params, model.config, model.tokenizer, [r.prompt for r in requests],
                               [r.target_new for r in requests])
        return float(np.mean([-s.logprob.mean() for s in scores]))

    assert loss(result.params) < loss(model.params) - 0.3
    assert result.log[-1]["loss"] < result.log[0]["loss"]
    before, after = flatten(model.params), flatten(result.params)
    changed = [n for n in before if not np.array_equal(np.asarray(before[n]), np.asarray(after[n]))]
    assert changed == ["model.layers.2.mlp.down_proj.weight"]
    delta = np.asarray(after[changed[0]], np.float64) - np.asarray(before[changed[0]], np.float64)
    assert np.linalg.matrix_rank(delta, tol=1e-6 * np.abs(delta).max()) <= 2  # a rank-2 update


def test_quality_compares_variants_in_a_table_and_a_plot(tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    code = main(["quality", "--model", str(tiny_llama_dir), "--edits", "3", "--relations", "capital",
                 "--variants", "plain", "+null-space", "+subject-null-space", "--epochs", "1", "--layer", "-1",
                 "--neighbours", "5", "--out", str(out),
                 "--set", "null_space_tol=1e-2", "--set", "null_space_mode=soft"])  # plain runs without them
    assert code == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["plain", "+null-space", "+subject-null-space"]
    assert {r["neighbours"] for r in rows} == {5}
    # +null-space keeps preserve.txt, the neighbours and the general-fact prompts, each prompt with the
    # model's own answer (a prompt the model answers with nothing is dropped)
    model = load_model(tiny_llama_dir)
    neighbours = [r.prompt for r in load_requests(DATA).requests[3:8]]
    prompts = neighbours + load_texts(EXPERIMENT_DATA / "preserve_facts.txt")
    answered = len(retain_requests(model.params, model.config, model.tokenizer, prompts))
    assert answered > 50
    assert [r["preserved_texts"] for r in rows] == [0, len(load_texts(EXPERIMENT_DATA / "preserve.txt")) + answered, 0]
    for row in rows:
        for key in ("reliability", "generalization", "generalization, 2nd rephrase", "locality (= pre-edit answer)",
                    "became an edit's target", "TF locality", "perplexity", "general facts (= pre-edit answer)",
                    "TF general facts"):
            assert math.isfinite(row[key]), key
        assert "known facts still right" in row  # None here: the random model knows no capital
        assert row["update action, edit prompts"] > 0 and math.isfinite(row["update action, locality prompts"])
        assert row["known neighbours kept"] == row["known neighbours"] == 0
        # every prompt's pre/post answers, per variant
        details = [json.loads(line) for line in (out / f"capital-{row['variant'].lstrip('+')}" / "per_request.jsonl")
                   .read_text().splitlines()]
        assert [d["probes"][0]["prompt"] for d in details] == [r.prompt for r in load_requests(DATA).requests[:3]]
        assert all("pre_answer" in p and "post_answer" in p for d in details for p in d["probes"])
        facts = (out / f"capital-{row['variant'].lstrip('+')}" / "general_facts.jsonl").read_text().splitlines()
        assert len(facts) == len(load_facts(EXPERIMENT_DATA / "general_facts.json"))
        assert {"pre_answer", "post_answer", "right_before", "right_after"} <= set(json.loads(facts[0]))
    assert "| capital | +null-space |" in (out / "report.md").read_text()
    assert (out / "quality.png").read_bytes().startswith(PNG_SIGNATURE)


def test_quality_splits_generalization_by_rephrase_and_leaves_out_a_trained_one():
    from experiments.quality import rephrase_generalization

    def row(*hits):
        return {"probes": [{"kind": "reliability", "generation": 1.0},
                           *({"kind": "generalization", "generation": h} for h in hits)]}

    rows = [row(1.0, 0.0), row(0.0, 1.0), row(1.0)]  # the last record has one rephrase only
    assert rephrase_generalization(rows, trained_on=False) == {
        "generalization": pytest.approx(2 / 3), "generalization, 2nd rephrase": 0.5}
    assert rephrase_generalization(rows, trained_on=True)["generalization, 2nd rephrase"] is None


def test_quality_counts_each_known_neighbour_once():
    from experiments.quality import distinct_known_neighbours

    def probe(prompt, retained=None):
        out = {"kind": "locality", "prompt": prompt, "generation": 1.0}
        return out if retained is None else {**out, "generation_retained": retained}

    rows = [{"probes": [probe("The capital of Russia is", 0.0), probe("The capital of Peru is", 1.0)]},
            {"probes": [probe("The capital of Russia is", 0.0), probe("The capital of Chad is")]},
            {"probes": [probe("The capital of Peru is", 1.0), probe("The capital of Kenya is", 1.0)]}]
    assert distinct_known_neighbours(rows) == {"known neighbours": 3, "known neighbours kept": 2}


def _lifelong(model_dir: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["lifelong", "--model", str(model_dir), "--data", str(data), "--epochs", "1", "--layer", "-1",
                 "--out", str(out), "--styles", "teacher_forced", "--capability-text", "", *extra])


def test_lifelong_resume_keeps_a_finished_variant_in_the_table_and_the_plot(tiny_llama_dir, tmp_path, monkeypatch,
                                                                            capsys):
    from experiments import lifelong

    plotted = []

    def line_panels(path, x, panels, *args, **kwargs):
        plotted.append(sorted(panels["reliability"]))
        return path

    monkeypatch.setattr(lifelong.plots, "line_panels", line_panels)
    data, out = tmp_path / "one.json", tmp_path / "r"
    data.write_text(json.dumps(json.loads(DATA.read_text())[:1]))
    assert _lifelong(tiny_llama_dir, data, out, "--edits", "2", "--no-baseline") == 0
    capsys.readouterr()
    assert _lifelong(tiny_llama_dir, data, out, "--edits", "2", "--resume") == 0
    assert "LocFT-BF: kept from rows.jsonl" in capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["run"] for r in rows] == ["unedited", "LocFT-BF", "FT-M depth-first"]
    # the kept variant's reliability by position is still drawn beside the new one's
    assert plotted[-1] == ["FT-M depth-first, teacher-forced", "LocFT-BF, teacher-forced"]


def test_a_resumed_sweep_refuses_rows_from_other_settings(tiny_llama_dir, tmp_path, capsys):
    """A row kept by --resume must come from the same model, requests, edit config and scoring: a table
    of 2-edit and 3-edit runs (or two learning rates) under one header is refused, not written."""
    data, out = tmp_path / "one.json", tmp_path / "r"
    data.write_text(json.dumps(json.loads(DATA.read_text())[:1]))
    assert _lifelong(tiny_llama_dir, data, out, "--edits", "2", "--no-baseline") == 0
    config, results = (out / "config.json").read_text(), (out / "results.json").read_text()
    capsys.readouterr()
    for change in (["--edits", "3"], ["--edits", "2", "--lr", "0.1"], ["--edits", "2", "--eval-sample", "1"]):
        assert _lifelong(tiny_llama_dir, data, out, *change, "--resume") == 2
        err = capsys.readouterr().err
        assert "error:" in err and "'LocFT-BF'" in err and "other settings" in err, err
        # the run directory still describes the run its rows come from
        assert (out / "config.json").read_text() == config and (out / "results.json").read_text() == results
        assert len((out / "rows.jsonl").read_text().splitlines()) == 1


def test_incremental_edit_runs_chain_from_a_run_directory_or_its_export(tiny_llama_dir, tmp_path, capsys):
    """``edit --model DIR`` (an earlier edit's run directory) starts from that run's edited export; the
    new run's config.json records the chain of runs its model came from; the replayed requests' pre-edit
    answers are the edited model's, not the original's."""
    records = json.loads(DATA.read_text())
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps(records[:2]))
    second.write_text(json.dumps(records[2:3] + records[:2]))  # a new edit, the earlier two replayed

    def edit_run(model: Path, data: Path, out: Path, *extra: str) -> int:
        return main(["edit", "--model", str(model), "--data", str(data), "--epochs", "2", "--layer", "-1",
                     "--lr", "0.01", "--out", str(out), "--styles", "generation", "--general-facts", "", *extra])

    assert edit_run(tiny_llama_dir, first, tmp_path / "r1", "--export-hf") == 0
    assert edit_run(tmp_path / "r1", second, tmp_path / "r2", "--export-hf") == 0
    assert edit_run(tmp_path / "r2" / "hf", first, tmp_path / "r3") == 0
    chain = json.loads((tmp_path / "r3" / "config.json").read_text())["edited_from"]
    assert [(c["run_dir"], c["model"], c["data"], c["edits"]) for c in chain] == [
        (str(tmp_path / "r2"), str(tmp_path / "r1"), str(second), 3),
        (str(tmp_path / "r1"), str(tiny_llama_dir), str(first), 2),
    ]
    assert all(c["edit_config"]["lr"] == 0.01 for c in chain)

    def answers(run: Path, key: str) -> dict:
        rows = [json.loads(line) for line in (run / "per_request.jsonl").read_text().splitlines()]
        return {(p["kind"], p["prompt"]): p[key] for row in rows for p in row["probes"]}

    after_first, before_second = answers(tmp_path / "r1", "post_answer"), answers(tmp_path / "r2", "pre_answer")
    assert after_first != answers(tmp_path / "r1", "pre_answer")  # the first run changed answers
    assert after_first.keys() <= before_second.keys()
    assert {k: before_second[k] for k in after_first} == after_first

    capsys.readouterr()
    assert edit_run(tmp_path / "r3", first, tmp_path / "r4") == 2  # r3 was run without --export-hf
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'r3'}: an edit run directory without an HF export" in err, err


def test_lifelong_edits_arriving_in_buffers_train_one_after_another_and_are_scored_on_all(tiny_llama_dir, tmp_path):
    """``--buffer B``: the edits arrive B at a time; each buffer is trained breadth-first on the model the
    previous one left (``--replay``: with every earlier edit again); scored once, after the last, on all."""
    from experiments.lifelong import BufferedVariant
    from locft_jax.engine import edit

    model = load_model(tiny_llama_dir)
    requests = synthetic_requests(3)
    cfg = EditConfig(layers=(-1,), lr=1e-2, epochs=2, batch_size=2, skip_step_loss=0.0, early_stop_loss=0.0)
    name = "model.layers.3.mlp.down_proj.weight"
    for replay in (False, True):
        result = BufferedVariant("b", cfg, {}, buffer=2, replay=replay).edit(model, requests)
        first = edit(model, requests[:2], cfg)
        second = edit(model.with_params(first.params), requests if replay else requests[2:], cfg)
        np.testing.assert_allclose(np.asarray(result.trainable[name]), np.asarray(second.trainable[name]), atol=1e-6)
        assert [(e["buffer"], e["epoch"]) for e in result.log] == [(0, 0), (0, 1), (1, 0), (1, 1)]

    out = tmp_path / "r"
    assert main(["lifelong", "--model", str(tiny_llama_dir), "--data", str(DATA), "--edits", "3", "--epochs", "1",
                 "--layer", "-1", "--out", str(out), "--buffer", "2", "--no-baseline"]) == 0
    rows = _results(out, ["LocFT-BF, buffers of 2"], ["pipeline", "buffer"])
    assert [(r["buffer"], r["edits"], r["evaluated"], r["epochs_run"]) for r in rows[1:]] == [(2, 3, 3, 2)]
    variant = json.loads((out / "config.json").read_text())["variants"][0]
    assert (variant["buffer"], variant["replay"]) == (2, False)
