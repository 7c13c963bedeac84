"""``bench generate``: greedy scoring generation, locft-jax vs transformers ``generate``, same prompts.

The prompts every edit run generates for: each of the first ``--edits`` country records' edit
prompt, rephrases and locality prompts, plus the general facts (``--facts``). Both sides stop a row
at EOS or at a token holding "." or a newline (the paper's scoring), up to ``--max-new-tokens``.
locft-jax: ``generate.generate_ids`` (KV cache, continuous batching over ``--slots`` slots).
transformers: ``model.generate(do_sample=False)`` in left-padded batches of ``--torch-batch``,
shortest prompts first, a stopping criterion per row — the straightforward batched way, where a
batch runs until its longest answer ends. Runs alternate; medians over ``--repeats``; the first
locft-jax call (which compiles) is reported apart. The token ids are compared prompt by prompt.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments.bench import common
from locft_jax import generate
from locft_jax.data import load_requests
from locft_jax.evaluate.edits import probes_of
from locft_jax.evaluate.unrelated import load_facts
from locft_jax.tokens import encode_prompt

GENERAL_FACTS = common.REPO / "experiments" / "data" / "general_facts.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF dir, .gguf or locft checkpoint (default: embedded SmolLM2)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--edits", type=int, default=50, help="country records whose prompts are generated (50)")
    parser.add_argument("--facts", default=str(GENERAL_FACTS), help="general facts file ('' for none)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--slots", type=int, default=generate.DEFAULT_BATCH_SIZE, help="locft-jax decode slots")
    parser.add_argument("--torch-batch", type=int, default=generate.DEFAULT_BATCH_SIZE, help="transformers batch size")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-torch", action="store_true", help="time locft-jax only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="results directory (default: runs/bench-generate-<time>/)")
    parser.set_defaults(random_shape=None, tokenizer=None)


def run(args: argparse.Namespace) -> int:
    started = common.started_record()
    results = measure(args)
    common.write_results(args, "generate", results, table(results), started)
    return 0


def scoring_prompts(n_records: int, facts_path: str) -> list[str]:
    """The distinct prompts an edit run generates for: the records' probes, then the general facts."""
    records = load_requests(common.COUNTRY_CAPITALS, limit=n_records).requests
    prompts = list(dict.fromkeys(p.prompt for p in probes_of(records)))
    if facts_path:
        prompts += [f.prompt for f in load_facts(facts_path) if f.prompt not in prompts]
    return prompts


def measure(args: argparse.Namespace) -> dict[str, Any]:
    prompts = scoring_prompts(args.edits, args.facts)  # a bad --edits / --facts fails before the model loads
    if not prompts:
        raise ValueError("bench generate: no prompts to generate for (--edits 0 and --facts '')")
    mesh = common.single_device_mesh()
    model = common.load_bench_model(args, mesh)
    ids = [encode_prompt(model.tokenizer, p) for p in prompts]
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    stop = generate.stop_token_mask(
        model.config.vocab_size,
        generate.eos_ids(model.config, model.tokenizer),
        model.tokenizer,
        generate.DEFAULT_STOP_AT,
    )
    common.progress(f"{len(prompts)} prompts, {common.model_source(args)} ({args.dtype})")

    def ours() -> list[list[int]]:
        return generate.generate_ids(model.params, model.config, ids, stop, args.max_new_tokens, args.slots, pad)

    t0 = time.perf_counter()
    with common.compile_timer() as events:
        first = ours()
    first_call = {"seconds": time.perf_counter() - t0, "compile_seconds": sum(d for _, d in events)}
    torch_model = None
    if not args.no_torch:
        from experiments.bench import torch_reference

        torch_model = torch_reference.load_torch_model(common.model_source(args), args.dtype)
        torch_reference.torch.set_num_threads(args.torch_threads)
    runs: dict[str, list[dict[str, Any]]] = {"jax": [], **({} if torch_model is None else {"torch": []})}
    answers = {"jax": first}
    for repeat in range(args.repeats):
        for variant in runs:
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            if variant == "jax":
                out = ours()
            else:
                out = torch_greedy(torch_model, ids, stop, args.max_new_tokens, args.torch_batch, pad)
            seconds = time.perf_counter() - t0
            answers[variant] = out
            runs[variant].append({"seconds": seconds, "tokens": sum(map(len, out)), "load_1min_before": load})
            common.progress(f"{variant} repeat {repeat + 1}/{args.repeats}: {seconds:.1f} s")
    same = None
    if "torch" in answers:
        same = sum(a == b for a, b in zip(answers["jax"], answers["torch"], strict=True)) / len(ids)
    medians = {
        v: {"seconds": common.median([r["seconds"] for r in rs]), "tokens": rs[-1]["tokens"]} for v, rs in runs.items()
    }
    return {
        "model": common.model_source(args),
        "prompts": len(ids),
        "prompt_tokens": sum(map(len, ids)),
        "slots": args.slots,
        "torch_batch": args.torch_batch,
        "torch_threads": args.torch_threads if torch_model is not None else None,
        "first_jax_call": first_call,
        "runs": runs,
        "medians": medians,
        "same_tokens_as_torch": same,
    }


def torch_greedy(
    hf_model: Any,
    prompt_ids: Sequence[Sequence[int]],
    stop_mask: np.ndarray,
    max_new_tokens: int,
    batch_size: int,
    pad_id: int,
) -> list[list[int]]:
    """transformers' batched greedy ids per prompt, up to and including the first stop token."""
    import torch
    import transformers

    stop = torch.from_numpy(stop_mask)

    class StopRows(transformers.StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
            return stop[input_ids[:, -1]]

    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    results: list[list[int]] = [[] for _ in prompt_ids]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        p = max(len(prompt_ids[i]) for i in rows)
        ids = torch.full((len(rows), p), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), p), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, p - len(prompt_ids[i]) :] = torch.tensor(prompt_ids[i])
            mask[r, p - len(prompt_ids[i]) :] = 1
        with torch.no_grad():
            out = hf_model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                stopping_criteria=transformers.StoppingCriteriaList([StopRows()]),
            )
        for r, i in enumerate(rows):
            results[i] = generate.cut_at_stop(out[r, p:].numpy(), stop_mask)
    return results


def table(results: dict[str, Any]) -> str:
    medians = results["medians"]
    torch_s = medians.get("torch", {}).get("seconds")
    rows = []
    for variant, med in medians.items():
        name = (
            f"locft-jax, {results['slots']} slots"
            if variant == "jax"
            else (f"transformers generate, batch {results['torch_batch']}, {results['torch_threads']} threads")
        )
        rows.append(
            [
                name,
                med["seconds"],
                results["prompts"] / med["seconds"],
                med["tokens"] / med["seconds"],
                torch_s / med["seconds"] if torch_s else None,
            ]
        )
    first = results["first_jax_call"]
    same = results["same_tokens_as_torch"]
    return "\n".join(
        [
            f"{results['prompts']} prompts ({results['prompt_tokens']} tokens), {results['model']}, "
            f"medians of {len(results['runs']['jax'])} repeats",
            "",
            common.markdown_table(["implementation", "s", "prompts/s", "new tokens/s", "× transformers"], rows),
            "",
            f"first locft-jax call: {first['seconds']:.1f} s, of which compiling {first['compile_seconds']:.1f} s",
            "" if same is None else f"same token ids as transformers: {same:.1%} of the prompts",
        ]
    )
