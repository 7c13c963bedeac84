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
        (["--set", "module=None"], "EditConfig.module must be a str, got None"),  # not the preset's, silently
        (["--lr", "inf"], "EditConfig.lr must be a finite number > 0, got inf"),
        (["--set", "lr=1e999"], "EditConfig.lr must be a finite number > 0, got inf"),
        (["--set", "seed=-1"], "EditConfig.seed must be >= 0, got -1"),
        (["--set", "retain_weight=-1"], "EditConfig.retain_weight must be a finite number >= 0"),
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


def test_edit_cli_edits_must_be_positive(tiny_llama_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["edit", "--model", str(tiny_llama_dir), "--data", str(DATA), "--edits", "-1",
              "--out", str(tmp_path / "r")])
    assert "--edits: must be >= 1, got -1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_edit_cli_out_that_is_a_file_is_one_clear_line(tiny_llama_dir, tmp_path, capsys):
    mine = tmp_path / "notes.txt"
    mine.write_text("keep me")
    code = main(["edit", "--model", str(tiny_llama_dir), "--data", str(DATA), "--edits", "2",
                 "--out", str(mine)])
    assert code == 2  # was a NotADirectoryError traceback
    assert f"{mine}: exists and is not a directory" in capsys.readouterr().err
    assert mine.read_text() == "keep me"


def test_edit_cli_set_none_replaces_the_presets_value(tiny_llama_dir, tmp_path):
    """``--set layers=None`` is the library's default layer (the reference's relative depth), not
    silently the preset's layer."""
    out = tmp_path / "r"
    assert main(["edit", "--model", str(tiny_llama_dir), "--data", str(DATA), "--edits", "2", "--epochs", "1",
                 "--general-facts", "", "--styles", "teacher_forced", "--preset", "smollm2-135m",
                 "--set", "layers=None", "--set", "prefix_cache_device_bytes=None", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())["edit_config"]
    assert config["layers"] is None and config["module"] == "mlp" and config["prefix_cache_device_bytes"] is None


def test_edit_cli_resume_refuses_other_settings_and_keeps_the_runs_config(tiny_llama_dir, tmp_path, capsys):
    """--resume continues the saved run: options that would change it are an error (they were silently
    ignored), and a refused resume leaves config.json as the run wrote it (it was overwritten first)."""
    out = tmp_path / "r"
    command = ["edit", "--model", str(tiny_llama_dir), "--data", str(DATA), "--edits", "2", "--layer", "2",
               "--epochs", "1", "--general-facts", "", "--styles", "teacher_forced", "--out", str(out)]
    assert main(command) == 0
    saved = (out / "config.json").read_text()
    capsys.readouterr()
    assert main([*command, "--resume", "--epochs", "3", "--set", "seed=1"]) == 2
    err = capsys.readouterr().err
    assert "--resume continues the run" in err and "epochs=3 (the run has 1)" in err and "seed=1 (the run has 0)" in err
    assert main([*command, "--resume", "--edits", "3"]) == 2  # other data: the checkpoint's fingerprint refuses
    assert "checkpoint is from a different run" in capsys.readouterr().err
    assert (out / "config.json").read_text() == saved
    assert main([*command, "--resume"]) == 0  # the same options, given again, agree with the run
    assert len((out / "log.jsonl").read_text().splitlines()) == 1


def test_a_resumed_runs_log_has_each_epoch_once(tiny_llama_dir, tmp_path, monkeypatch):
    """Killed after an epoch's log line but before its checkpoint was final: the resumed run redoes that
    epoch, and log.jsonl is the checkpoint's log plus the new epochs (it had the redone epoch twice)."""
    from locft_jax.engine import checkpoint

    real_save = checkpoint.save_state

    def killed_at_epoch_1(root, epoch, *args):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_save(root, epoch, *args)

    command = ["edit", "--model", str(tiny_llama_dir), "--data", str(DATA), "--edits", "2", "--layer", "2",
               "--epochs", "3", "--set", "early_stop_loss=0", "--general-facts", "", "--styles", "teacher_forced",
               "--out", str(tmp_path / "r")]
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_state", killed_at_epoch_1)
        with pytest.raises(KeyboardInterrupt):
            main(command)
    assert main([*command, "--resume"]) == 0
    log = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [0, 1, 2]


@pytest.mark.parametrize(
    "text,message",
    [('{"name": "locations"}', "no 'edit_config': not an edit run's config"),  # was a KeyError traceback
     ("garbage", "not valid JSON"),
     ('{"edit_config": {"lr": "x"}}', "EditConfig.lr must be a number")],
)
def test_edit_cli_resume_of_a_directory_without_an_edit_config_names_the_file(tiny_llama_dir, tmp_path, capsys,
                                                                             text, message):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.json").write_text(text)
    code = main(["edit", "--model", str(tiny_llama_dir), "--data", str(DATA), "--edits", "2", "--resume",
                 "--out", str(run)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{run / 'config.json'}: " in err and message in err
    assert (run / "config.json").read_text() == text and [p.name for p in run.iterdir()] == ["config.json"]


@pytest.mark.parametrize(
    "extra,message",
    [(["--lr", "1e-3", "--set", "lr=2e-3"], "--lr 0.001 and --set lr=0.002 disagree"),
     (["--layer", "2", "--set", "layers=[3]"], "--layer (2,) and --set layers=(3,) disagree"),
     (["--set", "seed=1", "--set", "seed=2"], "--set seed=1 and --set seed=2 disagree")],
)
def test_edit_cli_conflicting_values_of_one_field_are_an_error(tiny_llama_dir, tmp_path, capsys, extra, message):
    """Two values for one field were resolved silently (the last --set won)."""
    code = main(["edit", "--model", str(tiny_llama_dir), "--data", str(DATA), "--edits", "2",
                 "--out", str(tmp_path / "r"), *extra])
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--data", "--general-facts", "--preserve", "--retain"])
@pytest.mark.parametrize("kind", ["binary", "directory"])
def test_edit_cli_an_input_that_is_not_text_names_the_file(tiny_llama_dir, tmp_path, capsys, option, kind):
    """A directory was an IsADirectoryError traceback (--general-facts, --preserve), a binary file an
    unnamed "'utf-8' codec can't decode" line."""
    bad = tmp_path / "input"
    if kind == "binary":
        bad.write_bytes(b"\x89PNG\r\n\x1a\n\xf0\x28\x8c\x28" * 8)
    else:
        bad.mkdir()
    code = main(["edit", "--model", str(tiny_llama_dir), "--data", str(DATA), "--edits", "2",
                 "--set", "null_space_tol=1e-3", option, str(bad), "--out", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: ") and ("not UTF-8 text" if kind == "binary" else "directory") in err
    assert not (tmp_path / "r").exists()
