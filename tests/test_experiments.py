"""The command lines: the default demo end to end, and the `edit` experiment on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import experiments.edit
from experiments.cli_options import DEFAULT_FACTS
from experiments.run import main
from locft_jax import load_model
from locft_jax.data import load_requests
from locft_jax.evaluate import exact_match
from locft_jax.evaluate.unrelated import load_facts
from locft_jax.generate import generate_greedy

ROOT = Path(__file__).parents[1]
DATA = ROOT / "experiments" / "data" / "country_capitals.json"


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "LOCFT_CACHE_DIR": os.environ["LOCFT_CACHE_DIR"]}
    return subprocess.run([sys.executable, "-m", "experiments.run", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_default_demo_end_to_end_on_a_reduced_setting(tmp_path):
    out = tmp_path / "demo"
    proc = _run("--edits", "4", "--epochs", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("report.md", "metrics.json", "metrics.md", "per_request.jsonl", "log.jsonl", "config.json"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["post"]["generation/reliability"]["count"] == 4
    assert metrics["pre"]["generation/locality"]["value"] == 1.0  # pre vs pre, by construction
    assert metrics["pre"]["generation/reliability"]["value"] <= 0.25  # counterfactuals: unknown before
    assert (out / "hf" / "model.safetensors").exists() and (out / "hf" / "config.json").exists()
    assert "same as locft-jax" in proc.stdout  # transformers reloaded the export and agreed
    assert "Before → after the edit" in proc.stdout


def test_edit_cli_writes_config_log_metrics_and_export(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    code = main([
        "edit", "--model", str(tiny_llama_dir), "--data", str(DATA), "--edits", "6", "--layer", "2",
        "--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--set", "early_stop_loss=0",
        "--set", "skip_step_loss=0", "--out", str(out), "--export-hf",
    ])
    assert code == 0
    config = json.loads((out / "config.json").read_text())["edit_config"]
    assert config["layers"] == [2] and config["early_stop_loss"] == 0 and config["batch_size"] == 4
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    post = json.loads((out / "metrics.json").read_text())["post"]
    assert post["teacher_forced/reliability"]["count"] == 6
    assert post["update_action/edit_prompts"]["count"] == 6 and post["update_action/edit_prompts"]["value"] > 0
    assert "update_action/locality_prompts" in (out / "metrics.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    n_facts = len(load_facts(DEFAULT_FACTS))  # the shipped general facts, scored by default
    assert metrics["post"]["unrelated/generation"]["count"] == n_facts
    assert metrics["pre"]["unrelated/generation"]["value"] == metrics["pre"]["unrelated/teacher_forced"]["value"] == 1
    # each fact's answers before and after, agreeing with the metric
    answers = [json.loads(line) for line in (out / "general_facts.jsonl").read_text().splitlines()]
    assert [a["prompt"] for a in answers] == [f.prompt for f in load_facts(DEFAULT_FACTS)]
    same = np.mean([exact_match(a["post_answer"], a["pre_answer"]) for a in answers])
    assert same == pytest.approx(metrics["post"]["unrelated/generation"]["value"])
    assert (out / "hf" / "model.safetensors").exists()


def test_edit_cli_scores_a_fixed_sample_in_the_chosen_style(tiny_llama_dir, tmp_path, capsys):
    """All requests are edited; --eval-sample N scores N of them (the same N each run), --styles picks how."""
    args = ["edit", "--model", str(tiny_llama_dir), "--data", str(DATA), "--edits", "6", "--layer", "2",
            "--epochs", "1", "--general-facts", "", "--eval-sample", "4", "--styles", "teacher_forced"]
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        assert main([*args, "--out", str(out)]) == 0
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["post"]["teacher_forced/reliability"]["count"] == 4
    assert metrics["post"]["update_action/edit_prompts"]["count"] == 4
    assert not [name for name in metrics["post"] if name.startswith("generation/")]
    config = json.loads((runs[0] / "config.json").read_text())
    assert (config["edits"], config["evaluated"]) == (6, 4)
    assert "(6 edits, 4 of them scored: a fixed-seed sample)" in (runs[0] / "report.md").read_text()
    scored = [[json.loads(line)["prompt"] for line in (out / "per_request.jsonl").read_text().splitlines()]
              for out in runs]
    edited = [r.prompt for r in load_requests(DATA, limit=6).requests]
    assert scored[0] == scored[1] and len(scored[0]) == 4 and set(scored[0]) < set(edited)
    with pytest.raises(SystemExit):
        main([*args[:-4], "--eval-sample", "0", "--out", str(tmp_path / "c")])
    assert "--eval-sample: must be >= 1, got 0" in capsys.readouterr().err


def test_edit_cli_takes_retain_prompts_and_null_space_texts(tiny_llama_dir, tmp_path, monkeypatch):
    preserve = tmp_path / "preserve.txt"
    preserve.write_text("The sky is blue.\n\nWater is wet.\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of Chile is\nThe capital of Peru is\n")
    retain = tmp_path / "retain.jsonl"
    retain.write_text('{"prompt": "The capital of Peru is", "target_new": "x"}\n')
    out = tmp_path / "run"
    seen = {}

    def run_edit_job(*args, **kwargs):
        seen.update(kwargs)
        return real_run_edit_job(*args, **kwargs)

    real_run_edit_job = experiments.edit.run_edit_job
    monkeypatch.setattr(experiments.edit, "run_edit_job", run_edit_job)
    code = main([
        "edit", "--model", str(tiny_llama_dir), "--data", str(DATA), "--edits", "4", "--layer", "2",
        "--epochs", "1", "--batch-size", "4", "--retain", str(retain), "--preserve", str(preserve),
        "--preserve-prompts", str(prompts),
        "--set", "null_space_tol=1e-6", "--set", "retain_weight=0.5", "--out", str(out),
    ])
    assert code == 0
    # the retain prompt with the model's own answer; the preserved passages, then each prompt and its answer
    model = load_model(tiny_llama_dir)
    answers = generate_greedy(model.params, model.config, model.tokenizer, ["The capital of Chile is",
                                                                           "The capital of Peru is"], 16)
    chile, peru = (a.strip() for a in answers)
    assert seen["preserve"] == ["The sky is blue.", "Water is wet.",
                                f"The capital of Chile is {chile}", f"The capital of Peru is {peru}"]
    assert [r.target_new for r in seen["retain"]] == [peru]
    assert json.loads((out / "config.json").read_text())["edit_config"]["null_space_tol"] == 1e-6
    assert json.loads((out / "metrics.json").read_text())["post"]["teacher_forced/reliability"]["count"] == 4


def test_edit_cli_takes_neighbour_subjects_for_the_subject_scoped_null_space(tiny_llama_dir, tmp_path, capsys):
    neighbours = tmp_path / "neighbours.jsonl"
    neighbours.write_text('{"prompt": "The capital of Peru is", "target_new": "Lima", "subject": "Peru"}\n')
    out = tmp_path / "run"
    argv = ["edit", "--model", str(tiny_llama_dir), "--data", str(DATA), "--edits", "4", "--layer", "2",
            "--epochs", "1", "--batch-size", "4", "--preserve-subjects", str(neighbours),
            "--set", "null_space_tol=1e-6", "--set", "null_space_scope='subject'", "--out", str(out)]
    assert main(argv) == 0
    assert json.loads((out / "config.json").read_text())["edit_config"]["null_space_scope"] == "subject"
    by_name = ["edit", "--model", str(tiny_llama_dir), "--data", str(DATA), "--edits", "4", "--epochs", "1",
               "--preset", "smollm2-135m-subject", "--preserve-subjects", str(neighbours), "--out", str(out / "p")]
    assert main(by_name) == 0
    preset = json.loads((out / "p" / "config.json").read_text())["edit_config"]
    assert preset["null_space_scope"] == "subject" and preset["null_space_tol"] == 1e-3 and preset["lr"] == 1e-2
    neighbours.write_text('{"prompt": "The capital of Peru is", "target_new": "Lima"}\n')  # no subject
    assert main([*argv[:-1], str(tmp_path / "run2")]) != 0
    assert "preserve_subjects 0: field 'subject' is needed" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--module", "mlp", "--layer", "9"], "layer 9 out of range; valid: 0..3"),
        (["--set", "nonsense=1"], "--set nonsense: unknown field"),
        (["--set", "pipeline='zz'"], "EditConfig.pipeline='zz'; valid: bf, df"),
        (["--set", "lr=abc"], "EditConfig.lr must be a number, got 'abc'"),
        (["--set", "packing=false"], "EditConfig.packing must be True or False, got 'false'"),
        (["--set", "layers=2.5"], "EditConfig.layers must be an int or a list of ints, got 2.5"),
        (["--preserve-prompts", str(ROOT / "experiments" / "data" / "preserve_facts.txt")],
         "--preserve/--preserve-prompts need the null space: add --set null_space_tol=1e-3"),
    ],
)
def test_edit_cli_bad_input_is_one_clear_line(tiny_llama_dir, tmp_path, capsys, extra, message):
    code = main(["edit", "--model", str(tiny_llama_dir), "--data", str(DATA), "--edits", "2",
                 "--out", str(tmp_path / "r"), *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    out = tmp_path / "r"  # nothing to resume is left behind: the corrected command can use the directory
    assert not out.exists() or not any(out.iterdir())


def test_edit_cli_names_the_bad_record(tiny_llama_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "target_new": "b"}\n{"prompt": "c", "target_new": ""}\n')
    code = main(["edit", "--model", str(tiny_llama_dir), "--data", str(bad), "--out", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert "record 1" in err and "target_new" in err
    assert not (tmp_path / "r").exists()  # read before the run directory is made


def test_unknown_experiment_lists_the_choices(capsys):
    assert main(["nope"]) == 2
    assert "choose one of: default, edit, df-vs-bf" in capsys.readouterr().err


def test_edit_cli_rejects_a_bad_general_facts_file_before_any_output(tiny_llama_dir, tmp_path, capsys):
    facts = tmp_path / "facts.json"
    facts.write_text('[{"prompt": "The sky is", "answer": "blue"}, {"answer": "no prompt"}]')
    out = tmp_path / "run"
    code = main(["edit", "--model", str(tiny_llama_dir), "--data", str(DATA), "--edits", "2", "--epochs", "1",
                 "--general-facts", str(facts), "--out", str(out)])
    assert code == 2
    assert "record 1: missing field 'prompt'" in capsys.readouterr().err
    assert not out.exists()


def test_a_run_whose_first_checkpoint_fails_leaves_its_directory_reusable(tiny_llama_dir, tmp_path, monkeypatch):
    from locft_jax.engine import checkpoint

    def disk_full(root, epoch, *args):
        (Path(root) / f"partial-{epoch}").mkdir(parents=True)  # what an interrupted save may leave
        raise OSError("No space left on device")

    command = ["edit", "--model", str(tiny_llama_dir), "--data", str(DATA), "--edits", "2", "--epochs", "2",
               "--general-facts", "", "--out", str(tmp_path / "r")]
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_state", disk_full)
        with pytest.raises(OSError, match="No space left"):
            main(command)
    assert not any((tmp_path / "r").iterdir())  # the epoch-0 log line and the partial checkpoint are gone too
    assert main(command) == 0  # so the same command runs again in the same directory
    assert len((tmp_path / "r" / "log.jsonl").read_text().splitlines()) == 2


def test_a_failed_start_removes_only_what_the_run_wrote(tiny_llama_dir, tmp_path):
    """run_edit_job called by a library user on a directory with files of their own: those stay."""
    from experiments.pipeline import run_edit_job
    from locft_jax.data import load_requests
    from locft_jax.engine import EditConfig, LocationError

    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "log.jsonl").write_text("my own log\n")
    (run_dir / "notes.txt").write_text("keep me")
    model = load_model(tiny_llama_dir)
    with pytest.raises(LocationError):
        run_edit_job(model, load_requests(DATA, limit=2).requests, EditConfig(layers=(99,)), run_dir, job={})
    assert sorted(p.name for p in run_dir.iterdir()) == ["log.jsonl", "notes.txt"]
    assert (run_dir / "log.jsonl").read_text() == "my own log\n"
