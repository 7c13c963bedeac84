"""The demo: ~50 real counterfactual edits on the embedded SmolLM2-135M-Instruct, end to end."""

from __future__ import annotations

import argparse
import time

from experiments.cli_options import DEFAULT_DATA, add_edit_options, add_facts_option, edit_overrides, load_job_facts
from experiments.pipeline import load_job_model, new_run_dir, run_edit_job
from experiments.presets import edit_config
from locft_jax.data import load_requests
from locft_jax.evaluate import markdown_table
from locft_jax.generate import generate_greedy
from locft_jax.hosts import is_primary

SHOW = 6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--edits", type=int, default=50, help="how many counterfactuals to apply (default 50)")
    parser.add_argument("--out", help="run directory (default: runs/default-<time>/)")
    parser.add_argument("--no-reload-check", action="store_true", help="skip reloading the export in transformers")
    add_edit_options(parser)
    add_facts_option(parser)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    print("Loading SmolLM2-135M-Instruct (embedded GGUF, dequantized to float32) ...", flush=True)
    facts = load_job_facts(args)  # a bad file fails before any work
    model = load_job_model(None)
    requests = load_requests(DEFAULT_DATA, limit=args.edits).requests
    config = edit_config(model.config, args.preset, **edit_overrides(args))
    run_dir = new_run_dir(args.out, "default")

    shown = requests[:SHOW]
    before = generate_greedy(model.params, model.config, model.tokenizer, [r.prompt for r in shown])
    print(f"\nWhat the model answers now (real facts), {len(requests)} edits to apply:")
    for r, answer in zip(shown, before, strict=True):
        print(f"  {r.prompt!r:45} → {answer.strip()!r:18} (true: {r.ground_truth}; edit to: {r.target_new})")

    print(f"\nEditing: layers {list(config.layers or [])} {config.module}, lr {config.lr}, "
          f"batch {config.batch_size}, up to {config.epochs} epochs", flush=True)
    job = {"name": "default", "model": "embedded:SmolLM2-135M-Instruct", "data": str(DEFAULT_DATA),
           "edits": len(requests)}
    out = run_edit_job(model, requests, config, run_dir, job=job, facts=facts)

    after = generate_greedy(out.edit.params, model.config, model.tokenizer, [r.prompt for r in shown])
    print("\nBefore → after the edit:")
    for r, b, a in zip(shown, before, after, strict=True):
        print(f"  {r.prompt!r:45} {b.strip()!r:18} → {a.strip()!r}")
    print(f"\nTrained {len(out.edit.log)} epochs in {out.edit.seconds:.1f} s "
          f"(final loss {out.edit.log[-1]['loss']:.4f}, {out.edit.compiles} compiles)\n")
    print(markdown_table(out.evaluation))

    if not args.no_reload_check and is_primary():
        confirm_with_transformers(out.hf_dir, shown[0], after[0])
    facts_file = "general_facts.jsonl, " if facts else ""
    print(f"\nEverything is in {run_dir}/: report.md, metrics.json, metrics.md, per_request.jsonl, {facts_file}"
          f"log.jsonl, config.json, hf/ (a transformers checkpoint). Total {time.perf_counter() - t0:.0f} s.")
    return 0


def confirm_with_transformers(hf_dir, request, ours: str) -> None:
    """Reload the export with transformers (PyTorch) and check an edited answer through it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from locft_jax.generate import truncate_at_stops

    tok = AutoTokenizer.from_pretrained(hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = tok(request.prompt, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    text = truncate_at_stops(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True), (".", "\n"))
    same = "same as locft-jax" if text == ours else f"DIFFERENT from locft-jax's {ours!r}"
    edited = "the edit holds" if text.strip() == request.target_new else f"not the edit target {request.target_new!r}"
    print(f"\ntransformers, reloading {hf_dir}: {request.prompt!r} → {text.strip()!r} ({same}; {edited})")
