"""What the named experiments share: run several edit configurations on one model and one set of
requests, score each against a single pre-edit snapshot, and write the results table.

An experiment module builds its ``Variant`` list and plots; ``start`` / ``Job.run`` /
``Job.finish`` do the rest::

    job = sweep.start(args, "batch-size")                     # run dir, model, requests, base config
    rows = job.run([Variant("bs 4", job.base.replace(batch_size=4), {"batch_size": 4})])
    job.finish(rows, ["batch_size"], plots=[...])              # results.json + report.md

Each row holds the variant's identifying fields, the metric columns of ``METRICS`` (None where
a scoring style was not run or the data has no such probe), the capability perplexity and the
edit's timing. Edit requests can be padded with synthetic facts (``with_synthetic``) when an
experiment needs more than the data set holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.baselines.lora import LoraConfig, lora_edit
from experiments.cli_options import add_edit_options, add_model_data_options, add_scoring_options, edit_overrides
from experiments.pipeline import eval_sample, load_job_model, load_job_requests, new_run_dir
from experiments.presets import edit_config
from locft_jax.engine import EditConfig, EditResult, edit
from locft_jax.engine.checkpoint import fingerprint
from locft_jax.evaluate import EvalResult, Metric, evaluate_requests, snapshot
from locft_jax.evaluate.capability import perplexity
from locft_jax.evaluate.metrics import LABELS
from locft_jax.files import write_text_atomic
from locft_jax.hosts import is_primary
from locft_jax.loading import Model
from locft_jax.requests import EditRequest

DEFAULT_CAPABILITY_TEXT = Path(__file__).parents[1] / "tests" / "data" / "capability" / "text.txt"
SYNTHETIC_SEED = 0

# result column → the evaluation metric it reports
METRICS = {
    "reliability_tf": "teacher_forced/reliability",
    "generalization_tf": "teacher_forced/generalization",
    "locality_tf": "teacher_forced/locality",
    "reliability_gen": "generation/reliability",
    "generalization_gen": "generation/generalization",
    "locality_gen": "generation/locality",
    "spill_gen": "generation/locality_spill",
}
# the four edit-success columns as plot legends name them
SCORE_LABELS = {
    "reliability_tf": "reliability (teacher-forced)",
    "generalization_tf": "generalization (teacher-forced)",
    "reliability_gen": "reliability (generation)",
    "generalization_gen": "generalization (generation)",
}
OTHER_COLUMNS = {
    "run": "the variant (\"unedited\": the model before editing)",
    "perplexity": "capability: " + LABELS["capability/perplexity"],
    "edits": "edit requests trained",
    "evaluated": "edit requests scored (all, or a fixed-seed sample: --eval-sample)",
    "seconds": "edit wall time: tokenizing, prefix cache, compiles and training (not evaluation)",
    "seconds_per_edit": "seconds / edits",
    "epochs_run": "epochs run (breadth-first) or requests trained (depth-first)",
    "train_loss": "last epoch's mean loss (breadth-first) or the mean over requests (depth-first)",
}
PERCENT_COLUMNS = set(METRICS)


# ---------------------------------------------------------------- command line


def add_sweep_options(parser: argparse.ArgumentParser, default_edits: int | None = None) -> None:
    """Model/data/edit options, ``--out`` and the scoring options every named experiment takes."""
    add_model_data_options(parser, default_edits)
    add_edit_options(parser)
    parser.add_argument("--layers", type=int, nargs="+", dest="layers", help="same as --layer")
    parser.add_argument("--out", help="run directory (default: runs/<experiment>-<time>/)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in --out: variants already in rows.jsonl are kept")
    parser.add_argument("--capability-text", default=str(DEFAULT_CAPABILITY_TEXT),
                        help="text whose perplexity measures general capability ('' to skip)")
    parser.add_argument("--capability-window", type=int, default=512,
                        help="perplexity window in tokens (capped at the model's max positions)")
    add_scoring_options(parser)


# ---------------------------------------------------------------- synthetic facts

SYNTHETIC_FACTS: dict[str, tuple[str, ...]] = {
    "favourite food": ("pizza", "sushi", "pasta", "curry", "tacos", "soup", "bread", "rice", "salad", "noodles",
                       "cheese", "chocolate"),
    "favourite colour": ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown",
                         "grey", "silver"),
    "home town": ("Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Dublin", "Nairobi", "Hanoi", "Madrid",
                  "Sydney", "Toronto"),
    "favourite sport": ("tennis", "football", "chess", "rowing", "cricket", "golf", "hockey", "boxing", "skiing",
                        "cycling", "judo", "surfing"),
    "profession": ("teacher", "pilot", "doctor", "farmer", "baker", "lawyer", "nurse", "chef", "painter",
                   "engineer", "writer", "dentist"),
}


def synthetic_requests(n: int, seed: int = SYNTHETIC_SEED) -> list[EditRequest]:
    """``n`` made-up facts, "The favourite food of person #123 is" → "sushi", the same for a seed.

    Person ``i`` gets relation ``i mod 5`` and a seeded random answer from that relation's 12
    words; each has one rephrase ("Person #123's favourite food is") and no locality probes.
    Prompts are unique, so every fact is a separate edit.
    """
    relations = list(SYNTHETIC_FACTS)
    picks = np.random.default_rng(seed).integers(0, 12, size=n)
    out = []
    for i in range(n):
        relation = relations[i % len(relations)]
        out.append(EditRequest(
            prompt=f"The {relation} of person #{i} is",
            target_new=SYNTHETIC_FACTS[relation][picks[i]],
            subject=f"person #{i}",
            rephrase_prompts=(f"Person #{i}'s {relation} is",),
            relation=relation,
        ))
    return out


def with_synthetic(requests: list[EditRequest], n: int, seed: int = SYNTHETIC_SEED) -> tuple[list[EditRequest], int]:
    """``requests`` padded to ``n`` with ``synthetic_requests``; also returns how many were added."""
    extra = max(0, n - len(requests))
    return list(requests[:n]) + synthetic_requests(extra, seed), extra


# ---------------------------------------------------------------- running


@dataclasses.dataclass(frozen=True)
class Variant:
    """One edit run of a sweep: its label, configuration and identifying columns in the table."""

    label: str
    config: EditConfig
    fields: dict[str, Any]
    lora: LoraConfig | None = None  # set: the LoRA baseline instead of training the module itself

    def to_json(self) -> dict[str, Any]:
        lora = None if self.lora is None else dataclasses.asdict(self.lora)
        return {"label": self.label, "fields": self.fields, "edit_config": self.config.to_dict(), "lora": lora}

    def edit(self, model: Model, requests: list[EditRequest]) -> EditResult:
        if self.lora is not None:
            return lora_edit(model, requests, self.config, self.lora)
        return edit(model, requests, self.config)


@dataclasses.dataclass(frozen=True)
class Scoring:
    styles: tuple[str, ...]
    capability_text: str | None
    capability_window: int
    eval_sample: int | None


@dataclasses.dataclass
class Job:
    """One named experiment's run: where it writes, what it edits, and how it scores."""

    name: str
    args: argparse.Namespace
    run_dir: Path
    model: Model
    requests: list[EditRequest]
    synthetic: int  # how many of ``requests`` are synthetic facts (the last ones)
    base: EditConfig  # preset + command-line overrides; variants change a field or two of it
    scoring: Scoring
    # with --resume: the earlier config.json, written back if its rows are refused (``run``)
    _resumed_config: str | None = dataclasses.field(default=None, init=False, repr=False)

    def save_config(self, variants: Sequence[Variant], **extra: Any) -> None:
        """``config.json``: the arguments and every variant's full configuration (enough to re-run)."""
        record = {
            "experiment": self.name,
            "argv": vars(self.args),
            "model": self.args.model or "embedded:SmolLM2-135M-Instruct",
            "data": self.args.data,
            "edits": len(self.requests),
            "synthetic_edits": self.synthetic,
            "synthetic_seed": SYNTHETIC_SEED,
            "scoring": dataclasses.asdict(self.scoring),
            "base_edit_config": self.base.to_dict(),
            "variants": [v.to_json() for v in variants],
            **extra,
        }
        path = self.run_dir / "config.json"
        if getattr(self.args, "resume", False) and path.exists():
            self._resumed_config = path.read_text()  # put back if the kept rows turn out to be of another run
        if is_primary():  # multi-host: process 0 writes the run's files
            write_text_atomic(path, json.dumps(record, indent=2, default=str) + "\n")

    def run(
        self,
        variants: Sequence[Variant],
        requests: list[EditRequest] | None = None,
        pre_row: dict | None = None,
        on_evaluated: Callable[[Variant, EvalResult], dict[str, Any] | None] | None = None,
    ) -> list[dict[str, Any]]:
        """Edit and score each variant on ``requests`` (default: the job's).

        ``pre_row``: fields of a first row scoring the unedited model; ``on_evaluated`` sees each
        variant's full evaluation (per-request scores), which the rows only summarise; the fields it
        returns join the variant's row (so a row kept by ``--resume`` still has them). Each row is
        also appended to ``rows.jsonl`` as soon as it exists, with the fingerprint of its settings
        (``settings``): ``--resume`` keeps a row only for the same model, requests, edit config and
        scoring, and refuses to mix in a row of other settings.
        """
        requests = self.requests if requests is None else requests
        scored = eval_sample(requests, self.scoring.eval_sample)
        model, styles = self.model, self.scoring.styles
        pre = snapshot(model.params, model.config, model.tokenizer, scored, styles)
        rows, pre_metrics = [], None
        finished = self.finished_rows()
        for k, variant in enumerate(variants, 1):
            settings = self.row_settings(variant, requests)
            if variant.label in finished:
                if finished[variant.label].get("settings") != settings:
                    self._refuse_other_settings(variant.label)
                print(f"[{self.name}] {k}/{len(variants)} {variant.label}: kept from rows.jsonl", flush=True)
                rows.append(finished[variant.label])
                continue
            print(f"[{self.name}] {k}/{len(variants)} {variant.label}: {len(requests)} edits ...", flush=True)
            result = variant.edit(model, requests)
            evaluation = evaluate_requests(result.params, model.config, model.tokenizer, scored, pre=pre, styles=styles)
            pre_metrics = evaluation.pre
            extra = on_evaluated(variant, evaluation) if on_evaluated is not None else None
            rows.append({
                "run": variant.label, **variant.fields, **metric_columns(evaluation.post),
                "perplexity": self.perplexity(result.params), "evaluated": len(scored),
                **timing(result, variant.config, len(requests)), **(extra or {}), "settings": settings,
            })
            if is_primary():
                with open(self.run_dir / "rows.jsonl", "a") as f:  # kept if a later, bigger variant fails
                    f.write(json.dumps(rows[-1]) + "\n")
        if pre_row is not None and pre_metrics is None:  # every variant was kept from an earlier run
            pre_metrics = evaluate_requests(model.params, model.config, model.tokenizer, scored, pre=pre,
                                            styles=styles).pre
        if pre_row is not None and pre_metrics is not None:
            rows.insert(0, {"run": "unedited", **pre_row, **metric_columns(pre_metrics),
                            "perplexity": self.pre_perplexity, "evaluated": len(scored)})
        return rows

    def row_settings(self, variant: Variant, requests: list[EditRequest]) -> str:
        """The fingerprint of what a variant's row depends on: model, dtype, requests, its edit
        config (and LoRA), scoring. Equal fingerprints: a kept row belongs in this run's table."""
        return fingerprint(
            self.name, self.args.model or "embedded:SmolLM2-135M-Instruct", getattr(self.args, "dtype", None),
            variant.to_json(), [dataclasses.asdict(r) for r in requests], dataclasses.asdict(self.scoring),
        )

    def _refuse_other_settings(self, label: str) -> None:
        if is_primary() and self._resumed_config is not None:
            write_text_atomic(self.run_dir / "config.json", self._resumed_config)  # it describes the kept rows
        raise ValueError(
            f"{self.run_dir / 'rows.jsonl'}: the row of {label!r} comes from a run with other settings (model, "
            f"data, --edits, edit config or scoring); --resume keeps only rows of the same run: drop the changed "
            f"options, or start a new run in another --out"
        )

    def finished_rows(self) -> dict[str, dict[str, Any]]:
        """With ``--resume``: the rows an interrupted run already wrote, by variant label."""
        path = self.run_dir / "rows.jsonl"
        if not getattr(self.args, "resume", False) or not path.exists():
            return {}
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # the line being written when the run was killed
                continue
        if is_primary():
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
        return {row["run"]: row for row in rows}

    def perplexity(self, params) -> float | None:
        if not self.scoring.capability_text:
            return None
        window = min(self.scoring.capability_window, self.model.config.max_position_embeddings)
        text = Path(self.scoring.capability_text).read_text()
        return perplexity(params, self.model.config, self.model.tokenizer, text, window).value

    @functools.cached_property
    def pre_perplexity(self) -> float | None:
        return self.perplexity(self.model.params)

    def perplexity_panel(self, edited: Sequence[dict[str, Any]]) -> dict[str, dict[str, list]]:
        """A plot panel of the edited rows' perplexity beside the unedited model's (none if skipped)."""
        if not self.scoring.capability_text:
            return {}
        return {"perplexity": {"edited": column(edited, "perplexity"), "unedited": [self.pre_perplexity] * len(edited)}}

    def finish(
        self, rows: list[dict[str, Any]], id_columns: Sequence[str], plots: Sequence[Path] = (),
        notes: Sequence[str] = (),
    ) -> None:
        """Write ``results.json`` and ``report.md`` (the table, the notes, the plots) and print the table."""
        columns = list(dict.fromkeys(["run", *id_columns, *METRICS, *OTHER_COLUMNS]))
        descriptions = {**{k: LABELS[v] for k, v in METRICS.items()}, **OTHER_COLUMNS}
        results = {
            "experiment": self.name,
            "columns": {c: descriptions.get(c, "") for c in columns},
            "rows": [{c: row.get(c) for c in columns} for row in rows],
            "notes": list(notes),
            "plots": [Path(p).name for p in plots],
        }
        table = results_table(results["rows"], columns)
        if is_primary():
            write_text_atomic(self.run_dir / "results.json", json.dumps(results, indent=2) + "\n")
            write_text_atomic(self.run_dir / "report.md", self._report(table, descriptions, columns, plots, notes))
        print(table)
        print(f"run directory: {self.run_dir}")

    def _report(self, table: str, descriptions: dict, columns: Sequence[str], plots, notes) -> str:
        synthetic = f" ({self.synthetic} synthetic facts, seed {SYNTHETIC_SEED})" if self.synthetic else ""
        lines = [
            f"# {self.name}",
            "",
            f"- model: `{self.args.model or 'embedded:SmolLM2-135M-Instruct'}`; data: `{self.args.data}`; "
            f"{len(self.requests)} edits{synthetic}",
            f"- base edit config: `{json.dumps(self.base.to_dict())}`",
            f"- scoring: {', '.join(self.scoring.styles)}; capability text `{self.scoring.capability_text}`",
            *(f"- {note}" for note in notes),
            "",
            table,
            "",
            *(f"- **{c}**: {descriptions[c]}" for c in columns if descriptions.get(c)),
            "",
            *(f"![{Path(p).stem}]({Path(p).name})" for p in plots),
            "",
        ]
        return "\n".join(lines)


def start(args: argparse.Namespace, name: str, total_edits: int | None = None) -> Job:
    """Run dir, model, requests (padded with synthetic facts to ``total_edits``), base config."""
    run_dir = new_run_dir(args.out, name, args.resume)
    model = load_job_model(args.model, args.dtype)
    requests, synthetic = load_job_requests(args), 0
    if total_edits is not None:
        requests, synthetic = with_synthetic(requests, total_edits)
    base = edit_config(model.config, args.preset, **edit_overrides(args))
    scoring = Scoring(tuple(args.styles), args.capability_text or None, args.capability_window, args.eval_sample)
    return Job(name, args, run_dir, model, requests, synthetic, base, scoring)


# ---------------------------------------------------------------- rows and tables


def metric_columns(metrics: dict[str, Metric]) -> dict[str, float | None]:
    return {column: (metrics[name].value if name in metrics else None) for column, name in METRICS.items()}


def timing(result: EditResult, config: EditConfig, n_edits: int) -> dict[str, Any]:
    """Time and loss columns; a depth-first log has one entry per request, so its loss is their mean."""
    losses = [entry["loss"] for entry in result.log]
    return {
        "edits": n_edits,
        "seconds": result.seconds,
        "seconds_per_edit": result.seconds / n_edits,
        "epochs_run": len(result.log),
        "train_loss": float(np.mean(losses)) if config.pipeline == "df" else losses[-1],
    }


def _cell(column: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if column in PERCENT_COLUMNS:
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def results_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of ``rows``: metric columns as percentages, None as "–"."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(c, row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def column(rows: Sequence[dict[str, Any]], name: str) -> list[float | None]:
    return [row.get(name) for row in rows]
