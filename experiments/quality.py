"""``python -m experiments.run quality``: the plain recipe vs each option beyond the paper.

Variants (each adds one exact term to the training data; see ``locft_jax.augment``):
``plain`` (the preset's recipe), ``+retain`` (neighbours: the same relation for subjects not
edited in this run, trained towards the pre-edit model's own answers), ``+paraphrase`` (train on
rephrases other than the one evaluated), ``+prefix`` (the paper's prefix augmentation),
``+null-space`` (updates projected off the inputs to the edited tensor of the neighbours, of a
general text, ``data/preserve.txt``, disjoint from the perplexity text, and of general fact
prompts with the model's own answers, ``data/preserve_facts.txt``, disjoint from the scored
general facts; see ``locft_jax.engine.null_space``; ``null_space_tol`` from the config, 1e-3 when
unset),
``+subject-null-space`` (the same projection with ``null_space_scope="subject"``: off each edit
prompt's non-subject tokens and the neighbours' subject tokens, so the update acts through the
edited subjects only), ``all`` (every variant but the subject-scoped one).
Generalization is scored per rephrase: "generalization" on each record's first rephrase, which no
variant trains on (in the shipped sets it puts the subject first: "X's capital city is"), and
"generalization, 2nd rephrase" on its second ("The capital city of X is", the prompt's word order),
left empty for the variants that train on it (``+paraphrase``, ``all``). Locality is scored on the
data set's held-out locality prompts (never edited, never retained: the same relation, other
subjects) and on general facts (``--general-facts``; ``locft_jax.evaluate.unrelated``). For MLP
edits, "update action" columns say where the weight change acts: the mean over prompts of its
largest per-token ``‖ΔW k‖ / ‖W₀ k‖`` (``locft_jax.evaluate.update_action.action_metrics``), on
the edit prompts and on the locality prompts. "known neighbours kept" counts distinct prompts (the
pooled "known facts still right" weights each by how many records ask it). Each variant's metrics
and every prompt's pre/post answers go to ``<relation>-<variant>/`` in the run directory
(``metrics.json``, ``metrics.md``, ``per_request.jsonl``, and each general fact's answers in
``general_facts.jsonl``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from experiments.cli_options import add_edit_options, add_facts_option, edit_overrides, load_job_facts
from experiments.pipeline import load_job_model, new_run_dir
from experiments.presets import edit_config
from locft_jax.augment import paraphrase_augmented, prefix_augmented, preserve_texts, retain_requests
from locft_jax.data import load_requests, load_texts
from locft_jax.engine import edit
from locft_jax.evaluate import evaluate_requests, snapshot, write_jsonl, write_report
from locft_jax.evaluate.capability import perplexity
from locft_jax.evaluate.unrelated import fact_answers, fact_snapshot, unrelated_metrics
from locft_jax.evaluate.update_action import action_metrics
from locft_jax.files import write_text_atomic
from locft_jax.hosts import is_primary

DATA = Path(__file__).parent / "data"
RELATIONS = {"capital": DATA / "country_capitals.json", "language": DATA / "country_languages.json"}
VARIANTS = ("plain", "+retain", "+paraphrase", "+prefix", "+null-space", "+subject-null-space", "all")
DEFAULT_NULL_SPACE_TOL = 1e-3
COLUMNS = {
    "generation/reliability": "reliability",
    "generation/locality": "locality (= pre-edit answer)",
    "generation/locality_retained": "known facts still right",
    "generation/locality_spill": "became an edit's target",
    "teacher_forced/reliability": "TF reliability",
    "teacher_forced/locality": "TF locality",
    "unrelated/generation": "general facts (= pre-edit answer)",
    "unrelated/still_right": "general facts still right",
    "unrelated/teacher_forced": "TF general facts",
}
PARAPHRASE_VARIANTS = ("+paraphrase", "all")  # they train on every rephrase but the first
REPHRASE_COLUMNS = ("generalization", "generalization, 2nd rephrase")
ACTION_COLUMNS = {
    "update_action/edit_prompts": "update action, edit prompts",
    "update_action/locality_prompts": "update action, locality prompts",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="default: the embedded SmolLM2")
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--neighbours", type=int,
                        help="records after the edits used as neighbours (retain rows, null spaces; default: --edits)")
    parser.add_argument("--relations", nargs="+", default=list(RELATIONS), choices=list(RELATIONS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--text", default=str(DATA / "perplexity.txt"), help="perplexity text (capability)")
    parser.add_argument("--preserve-text", default=str(DATA / "preserve.txt"),
                        help="general text (one passage per line) that +null-space also preserves; '' for none")
    parser.add_argument("--preserve-facts", default=str(DATA / "preserve_facts.txt"),
                        help="prompts (one per line) whose own answers +null-space also preserves; '' for none")
    parser.add_argument("--out", help="run directory (default: runs/quality-<time>/)")
    add_edit_options(parser)
    add_facts_option(parser)


def run(args: argparse.Namespace) -> int:
    if args.neighbours is not None and args.neighbours < 0:
        raise ValueError(f"--neighbours must be >= 0, got {args.neighbours}")
    facts = load_job_facts(args)  # a bad file fails before any work
    general = load_texts(args.preserve_text) if args.preserve_text else []
    uses_null_space = bool({"+null-space", "all"} & set(args.variants))
    fact_prompts = load_texts(args.preserve_facts) if args.preserve_facts and uses_null_space else []
    run_dir = new_run_dir(args.out, "quality")
    model = load_job_model(args.model)
    config = edit_config(model.config, args.preset, **edit_overrides(args))
    job = {"argv": vars(args), "edit_config": config.to_dict()}
    primary = is_primary()  # multi-host: process 0 writes the run's files
    if primary:
        write_text_atomic(run_dir / "config.json", json.dumps(job, indent=2))
    text = Path(args.text).read_text()
    if fact_prompts:
        general += preserve_texts(retain_requests(model.params, model.config, model.tokenizer, fact_prompts))
    base_ppl = perplexity(model.params, model.config, model.tokenizer, text).value
    pre_facts = fact_snapshot(model.params, model.config, model.tokenizer, facts) if facts else None
    rows = []
    for relation in args.relations:
        records = load_requests(RELATIONS[relation]).requests
        n_neighbours = args.edits if args.neighbours is None else args.neighbours
        requests, neighbours = records[: args.edits], records[args.edits : args.edits + n_neighbours]
        scored = requests  # every rephrase: generalization is split per rephrase (rephrase_generalization)
        pre = snapshot(model.params, model.config, model.tokenizer, scored, ("teacher_forced", "generation"))
        retain = retain_requests(model.params, model.config, model.tokenizer, [r.prompt for r in neighbours])
        for variant in args.variants:
            train, keep = training_rows(variant, requests, retain, config.seed)
            # --set null_space_* belongs to the null-space variants
            variant_config, preserve, subjects = config.replace(null_space_tol=0.0, null_space_scope="all"), (), ()
            tol = config.null_space_tol or DEFAULT_NULL_SPACE_TOL
            if variant in ("+null-space", "all"):
                variant_config = config.replace(null_space_tol=tol, null_space_scope="all")
                # edit() adds the retain rows' texts itself
                preserve = general + ([] if keep else preserve_texts(retain))
            elif variant == "+subject-null-space":
                variant_config, subjects = config.replace(null_space_tol=tol, null_space_scope="subject"), neighbours
            result = edit(model, train, variant_config, retain=keep, preserve=preserve, preserve_subjects=subjects,
                          progress=True)
            ev = evaluate_requests(result.params, model.config, model.tokenizer, scored, pre=pre,
                                   styles=("teacher_forced", "generation"))
            details = run_dir / f"{relation}-{variant.lstrip('+')}"
            details.mkdir(exist_ok=True)
            if pre_facts is not None:
                post_facts = fact_snapshot(result.params, model.config, model.tokenizer, facts)
                ev.add_metrics(unrelated_metrics(pre_facts, post_facts))
                if primary:
                    write_jsonl(details / "general_facts.jsonl", fact_answers(pre_facts, post_facts))
            if primary:
                write_report(ev, details)
            ppl = perplexity(result.params, model.config, model.tokenizer, text).value
            row = {"relation": relation, "variant": variant, "train_rows": len(train), "retain_rows": len(keep),
                   "neighbours": len(neighbours), "preserved_texts": len(preserve),
                   "seconds": result.seconds, "epochs": len(result.log), "final_loss": result.log[-1]["loss"],
                   "perplexity": ppl, "perplexity_change": ppl / base_ppl - 1}
            row.update({name: ev.post[key].value for key, name in COLUMNS.items() if key in ev.post})
            row.update(rephrase_generalization(ev.per_request, trained_on=variant in PARAPHRASE_VARIANTS))
            row.update(distinct_known_neighbours(ev.per_request))
            actions = action_metrics(model.params, result.trainable, model.config, model.tokenizer, requests)
            row.update({name: actions[key].value for key, name in ACTION_COLUMNS.items() if key in actions})
            rows.append(row)
            print(json.dumps(row), flush=True)
    if primary:
        write_text_atomic(run_dir / "results.json", json.dumps({"base_perplexity": base_ppl, "rows": rows}, indent=2))
        write_text_atomic(run_dir / "report.md", table(rows, base_ppl))
        plot(rows, run_dir / "quality.png")
    print(table(rows, base_ppl))
    print(f"run directory: {run_dir}")
    return 0


def rephrase_generalization(per_request: list[dict], trained_on: bool) -> dict[str, float | None]:
    """Greedy exact match of the new target on each record's first and second rephrase, each
    averaged over the records that have it; the second is None when the variant trained on it."""
    hits: list[list[float]] = [[] for _ in REPHRASE_COLUMNS]
    for row in per_request:
        rephrases = [p["generation"] for p in row["probes"] if p["kind"] == "generalization"]
        for i, hit in enumerate(rephrases[: len(REPHRASE_COLUMNS)]):
            hits[i].append(hit)
    out = {name: float(np.mean(h)) if h else None for name, h in zip(REPHRASE_COLUMNS, hits, strict=True)}
    if trained_on:
        out[REPHRASE_COLUMNS[1]] = None
    return out


def distinct_known_neighbours(per_request: list[dict]) -> dict[str, int]:
    """Of the distinct locality prompts the unedited model answered right, how many still are."""
    kept = {p["prompt"]: p["generation_retained"] for row in per_request for p in row["probes"]
            if "generation_retained" in p}
    return {"known neighbours": len(kept), "known neighbours kept": int(sum(kept.values()))}


def training_rows(variant, requests, retain, seed):
    """(edit rows, retain rows) of a variant."""
    train = list(requests)
    if variant in PARAPHRASE_VARIANTS:
        train += paraphrase_augmented(requests)
    if variant in ("+prefix", "all"):
        train += prefix_augmented(requests, per_request=2, seed=seed)
    keep = retain if variant in ("+retain", "all") else []
    return train, keep


def table(rows: list[dict], base_ppl: float) -> str:
    others = [name for key, name in COLUMNS.items() if key != "generation/reliability"]
    names = ["relation", "variant", COLUMNS["generation/reliability"], *REPHRASE_COLUMNS, *others,
             "known neighbours kept", *ACTION_COLUMNS.values(), "perplexity_change", "seconds"]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row in rows:
        cells = []
        for name in names:
            value = row.get(name)
            if name == "seconds" and value is not None:
                cells.append(f"{value:.0f}")
            elif name == "known neighbours kept":
                cells.append(f"{value} of {row['known neighbours']}")
            elif name in ACTION_COLUMNS.values() and value is not None:
                cells.append(f"{value:.2f}")
            elif isinstance(value, float):
                cells.append(f"{value:.1%}")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nUnedited perplexity: {base_ppl:.2f}.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = ["reliability", "generalization", "known facts still right"]
    labels = [f"{r['relation']}\n{r['variant']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 4))
    for k, metric in enumerate(metrics):
        ax.bar(x + (k - 1) * 0.27, [r.get(metric) or 0.0 for r in rows], 0.27, label=metric)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("greedy exact match")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
