"""The edit job every experiment runs: load, edit, score before/after, report, export."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from locft_jax import Model, load_model
from locft_jax.data import load_requests
from locft_jax.engine import EditConfig, EditResult, edit
from locft_jax.engine.checkpoint import latest_state
from locft_jax.evaluate import EvalResult, evaluate_requests, markdown_table, snapshot, write_jsonl, write_report
from locft_jax.evaluate.unrelated import Fact, fact_answers, fact_snapshot, unrelated_metrics
from locft_jax.evaluate.update_action import action_metrics
from locft_jax.files import write_text_atomic
from locft_jax.hosts import barrier, is_primary, shared_timestamp
from locft_jax.requests import EditRequest

EVAL_STYLES = ("teacher_forced", "generation")
EVAL_SAMPLE_SEED = 0


def eval_sample(requests: list[EditRequest], limit: int | None) -> list[EditRequest]:
    """At most ``limit`` of ``requests``, a fixed-seed sample kept in their order (all when ``limit`` is None)."""
    if limit is None or limit >= len(requests):
        return requests
    if limit < 1:
        raise ValueError(f"eval sample must be >= 1 request, got {limit}")
    keep = np.sort(np.random.default_rng(EVAL_SAMPLE_SEED).choice(len(requests), limit, replace=False))
    return [requests[i] for i in keep]


def new_run_dir(out: str | Path | None, name: str, resume: bool = False) -> Path:
    """``out`` (or ``runs/<name>-<time>/``); with ``resume`` it must hold an earlier run.

    Multi-host: every process checks, then (after a barrier) creates the same directory, so a
    refusal is raised on all of them and none sees another's files as an earlier run.
    """
    path = Path(out) if out else Path("runs") / f"{name}-{shared_timestamp()}"
    if resume:
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: not a run directory (no config.json) to resume")
        return path
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path}: exists and is not a directory (--out names the run directory)")
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path}: already exists and is not empty (use --resume to continue that run)")
    barrier("new_run_dir")
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_job_model(path: str | None, dtype: str = "float32") -> Model:
    from convert.embedded import smollm2_gguf_path

    source = model_source(path) if path else smollm2_gguf_path()
    return load_model(source, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)


def model_source(path: str | Path) -> str | Path:
    """``path``, or for an edit run directory (``edit --out DIR``) the model it left: ``DIR/hf``."""
    run = Path(path).expanduser()
    if _edit_run_record(run) is None:
        return path
    if not (run / "hf" / "config.json").is_file():
        raise FileNotFoundError(f"{run}: an edit run directory without an HF export (DIR/hf: the run was not given "
                                f"--export-hf, or has not finished); pass a model, or a run that exported one")
    return run / "hf"


def edit_lineage(source: str | Path) -> list[dict[str, Any]]:
    """The edit runs a model came from, newest first: for a run's export ``DIR/hf``, that run's model,
    data, edits and edit config, then the runs its own model came from (empty for any other model)."""
    export = Path(source)
    record = _edit_run_record(export.parent) if export.name == "hf" else None
    if record is None:
        return []
    keys = ("model", "data", "edits", "edit_config")
    return [{"run_dir": str(export.parent), **{k: record.get(k) for k in keys}}, *record.get("edited_from", [])]


def _edit_run_record(run: Path) -> dict[str, Any] | None:
    """``run/config.json`` when ``run`` is an edit run's directory, else None."""
    try:
        record = json.loads((run / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("edit_config"), dict) else None


def load_job_requests(args: Any) -> list[EditRequest]:
    loaded = load_requests(args.data, format=args.format, skip_invalid=args.skip_invalid, limit=args.edits)
    if loaded.skipped:
        print(f"skipped {len(loaded.skipped)} invalid records (first: {loaded.skipped[0]})")
    return loaded.requests


@dataclasses.dataclass
class JobResult:
    edit: EditResult
    evaluation: EvalResult
    run_dir: Path
    hf_dir: Path | None


def run_edit_job(
    model: Model,
    requests: list[EditRequest],
    config: EditConfig,
    run_dir: Path,
    *,
    job: dict[str, Any],
    export: bool = True,
    resume: bool = False,
    styles: tuple[str, ...] = EVAL_STYLES,
    eval_limit: int | None = None,
    retain: list[EditRequest] | tuple = (),
    preserve: list[str] | tuple = (),
    preserve_subjects: list[EditRequest] | tuple = (),
    facts: list[Fact] | tuple = (),
) -> JobResult:
    """Edit, evaluate (pre-edit snapshot taken first), write report files and the HF export.

    ``retain`` / ``preserve`` / ``preserve_subjects``: passed to ``edit`` (retain rows; null-space
    texts; neighbours whose subjects the subject-scoped null space keeps). ``facts``: general facts
    scored before and after (``unrelated/*`` metrics; ``locft_jax.evaluate.unrelated``; each fact's
    answers in ``general_facts.jsonl``). ``eval_limit``: score a fixed-seed sample of at most this
    many of the requests (``eval_sample``; all are edited), e.g. for runs of 100K edits.
    """
    scored = eval_sample(requests, eval_limit)
    job = {**job, "evaluated": len(scored)}
    lineage = edit_lineage(model.source)  # incremental editing: the runs that edited this model before
    if lineage:
        job["edited_from"] = lineage
    primary = is_primary()  # multi-host: every process computes, process 0 writes
    created = [run_dir / name for name in ("config.json", "log.jsonl", "checkpoints") if not (run_dir / name).exists()]
    run_config = json.dumps({**job, "edit_config": config.to_dict()}, indent=2)
    if primary and not resume:  # a resumed run's config.json is rewritten once its checkpoint accepted the run
        write_text_atomic(run_dir / "config.json", run_config)
    pre = snapshot(model.params, model.config, model.tokenizer, scored, styles)
    pre_facts = fact_snapshot(model.params, model.config, model.tokenizer, facts) if facts else None
    try:
        result = edit(
            model, requests, config, checkpoint_dir=run_dir / "checkpoints", resume=resume, progress=True,
            log_path=run_dir / "log.jsonl", retain=retain, preserve=preserve, preserve_subjects=preserve_subjects,
        )
    except BaseException:
        if primary and not resume and latest_state(run_dir / "checkpoints") is None:
            _clear_failed_start(created)
        raise
    if primary and resume:
        write_text_atomic(run_dir / "config.json", run_config)
    evaluation = evaluate_requests(result.params, model.config, model.tokenizer, scored, pre=pre, styles=styles)
    evaluation.add_metrics(action_metrics(model.params, result.trainable, model.config, model.tokenizer, scored))
    if pre_facts is not None:
        post_facts = fact_snapshot(result.params, model.config, model.tokenizer, facts)
        evaluation.add_metrics(unrelated_metrics(pre_facts, post_facts), unrelated_metrics(pre_facts, pre_facts))
        if primary:
            write_jsonl(run_dir / "general_facts.jsonl", fact_answers(pre_facts, post_facts))
    if primary:
        write_report(evaluation, run_dir)
        write_text_atomic(run_dir / "report.md", report_markdown(job, config, result, evaluation))
    hf_dir = None
    if export:
        from convert.to_hf import export_hf

        hf_dir = run_dir / "hf"
        export_hf(result.params, model.config, model.tokenizer, hf_dir, overwrite=resume)
    return JobResult(result, evaluation, run_dir, hf_dir)


def _clear_failed_start(created: list[Path]) -> None:
    """Remove what a run that failed before its first checkpoint wrote (of ``created``: paths absent before it).

    A bad record or layer, or a first checkpoint that could not be saved: there is nothing to resume,
    so the config, the epoch-0 log line and any partial checkpoint go, and the corrected command
    can use the directory again.
    """
    for path in created:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def report_markdown(job: dict[str, Any], config: EditConfig, result: EditResult, evaluation: EvalResult) -> str:
    last = result.log[-1]
    scored = job.get("evaluated", job.get("edits"))
    sample = f", {scored} of them scored: a fixed-seed sample" if scored != job.get("edits") else ""
    return "\n".join([
        f"# Edit run: {job.get('name', 'edit')}",
        "",
        f"- model: `{job.get('model')}`; data: `{job.get('data')}` ({job.get('edits')} edits{sample})",
        f"- location: layers {list(result.location.layers)} / `{result.location.module}`; "
        f"lr {config.lr}, batch {config.batch_size}, epochs run {len(result.log)} of {config.epochs}",
        f"- final epoch loss {last['loss']:.4f}; train time {result.seconds:.1f} s; compiles {result.compiles}",
        "",
        markdown_table(evaluation),
        "",
    ])
