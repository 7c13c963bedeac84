"""``python -m experiments.run edit``: one edit run with every knob."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments.cli_options import (
    add_edit_options,
    add_facts_option,
    add_model_data_options,
    add_scoring_options,
    edit_overrides,
    load_job_facts,
)
from experiments.pipeline import load_job_model, load_job_requests, new_run_dir, run_edit_job
from experiments.presets import edit_config, given, preset_values
from locft_jax.augment import preserve_texts, retain_requests
from locft_jax.config import ModelConfig
from locft_jax.data import load_requests, load_texts
from locft_jax.engine import EditConfig
from locft_jax.evaluate import markdown_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_data_options(parser)
    add_edit_options(parser)
    add_facts_option(parser)
    add_scoring_options(parser)
    parser.add_argument("--out", help="run directory (default: runs/edit-<time>/)")
    parser.add_argument("--export-hf", action="store_true", help="write OUT/hf, a transformers checkpoint")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    parser.add_argument("--retain", help="requests file: its prompts keep the unedited model's answers (retain rows)")
    parser.add_argument(
        "--preserve", help="text file, one passage per line, that null-space projection keeps (--set null_space_tol=…)"
    )
    parser.add_argument(
        "--preserve-prompts",
        help="text file, one prompt per line: null-space projection keeps the model's own answers to them",
    )
    parser.add_argument(
        "--preserve-subjects",
        help="requests file (with subjects): the subject-scoped null space keeps these subjects "
        "(--set null_space_tol=1e-3 --set null_space_scope=subject)",
    )


def run(args: argparse.Namespace) -> int:
    # every input file is read first: a bad one fails before any work or output
    facts = load_job_facts(args)
    requests = load_job_requests(args)
    retain_prompts = [r.prompt for r in load_requests(args.retain).requests] if args.retain else []
    preserve = load_texts(args.preserve) if args.preserve else []
    preserve_prompts = load_texts(args.preserve_prompts) if args.preserve_prompts else []
    subjects = load_requests(args.preserve_subjects).requests if args.preserve_subjects else []
    run_dir = new_run_dir(args.out, "edit", args.resume)
    model = load_job_model(args.model, args.dtype)
    if args.resume:  # the saved config wins, so the resumed run is the same run
        config = resumed_config(run_dir, model.config, args)
    else:
        config = edit_config(model.config, args.preset, **edit_overrides(args))
    if (preserve or preserve_prompts) and not config.null_space_tol:  # before answering the prompts
        raise ValueError("--preserve/--preserve-prompts need the null space: add --set null_space_tol=1e-3")
    job = {"name": "edit", "model": args.model or "embedded:SmolLM2-135M-Instruct", "data": args.data,
           "edits": len(requests), "argv": vars(args)}
    retain = retain_requests(model.params, model.config, model.tokenizer, retain_prompts) if retain_prompts else []
    if preserve_prompts:
        preserve += preserve_texts(retain_requests(model.params, model.config, model.tokenizer, preserve_prompts))
    out = run_edit_job(model, requests, config, run_dir, job=job, export=args.export_hf, resume=args.resume,
                       retain=retain, preserve=preserve, preserve_subjects=subjects,
                       facts=facts, styles=tuple(args.styles), eval_limit=args.eval_sample)
    print(markdown_table(out.evaluation))
    print(f"run directory: {run_dir}")
    return 0


def resumed_config(run_dir: Path, model_config: ModelConfig, args: argparse.Namespace) -> EditConfig:
    """The run's saved EditConfig; options on the command line that would change it are an error, not ignored."""
    saved = saved_config(run_dir / "config.json")
    asked = {**(preset_values(args.preset, model_config) if args.preset else {}), **given(edit_overrides(args))}
    wanted = EditConfig.from_dict({**saved.to_dict(), **asked})
    changed = [f"{k}={getattr(wanted, k)!r} (the run has {getattr(saved, k)!r})"
               for k in asked if getattr(wanted, k) != getattr(saved, k)]
    if changed:
        raise ValueError(f"--resume continues the run in {run_dir} with its saved settings; the command line asks "
                         f"for {', '.join(changed)}: drop those options, or start a new run in another --out")
    return saved


def saved_config(path: Path) -> EditConfig:
    """The EditConfig a run directory's ``config.json`` holds; errors name the file."""
    try:
        values = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(values, dict) or not isinstance(values.get("edit_config"), dict):
        raise ValueError(f"{path}: no 'edit_config': not an edit run's config.json (--resume needs one)")
    try:
        return EditConfig.from_dict(values["edit_config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None
