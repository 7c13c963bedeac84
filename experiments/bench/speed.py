"""``bench speed``: locft-jax ``edit`` (prefix cache on and off) vs the PyTorch reference, same work.

Runs alternate (jax, jax without cache, torch, jax, ...) in one process so that load from the
other users of the machine hits all of them alike; medians over ``--repeats``. Every run starts
from the same weights, and the trained tensors are compared: equal weights make the timing honest.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

from experiments.bench import common

JAX_VARIANTS = ("jax", "jax_no_cache")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser, edits=64, epochs=3, repeats=3)
    parser.add_argument("--no-torch", action="store_true", help="time locft-jax only")
    parser.add_argument("--no-uncached", action="store_true", help="skip locft-jax with prefix_cache=False")
    parser.add_argument("--torch-device", default="cpu", help="device of the PyTorch reference (cpu, cuda)")
    parser.add_argument("--torch-threads", type=int, nargs="+", default=[os.cpu_count() or 1],
                        help="torch CPU threads; several values time one reference run each (default: all cores)")


def run(args: argparse.Namespace) -> int:
    started = common.started_record()
    results = measure(args)
    common.write_results(args, "speed", results, table(results), started)
    return 0


def measure(args: argparse.Namespace) -> dict[str, Any]:
    mesh = common.single_device_mesh()
    model = common.load_bench_model(args, mesh)
    common.progress(f"model ready: {common.model_source(args)} ({args.dtype})")
    requests = common.country_requests(args.edits)
    config = common.edit_config(args)
    torch_model = None if args.no_torch else _torch_model(args, model)
    torch_variants = {} if torch_model is None else _torch_variants(args)
    if torch_model is not None:
        from experiments.bench import torch_reference

        common.progress(f"torch reference model ready on {args.torch_device}")
        original = torch_reference.down_proj(torch_model, args.layer).detach().clone()

    jax_variants = JAX_VARIANTS[:1] if args.no_uncached else JAX_VARIANTS
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in (*jax_variants, *torch_variants)}
    checks: list[dict[str, Any]] = []
    base = _base_weight(model, config)
    for repeat in range(args.repeats):
        done = f"repeat {repeat + 1}/{args.repeats}"
        load = os.getloadavg()[0]
        cached = common.timed_edit(model, requests, config, mesh)
        runs["jax"].append({**cached.summary(len(requests)), "load_1min_before": load})
        common.progress(f"jax {done}: {cached.seconds:.1f} s")
        check = {}
        if not args.no_uncached:
            load = os.getloadavg()[0]
            plain = common.timed_edit(model, requests, config.replace(prefix_cache=False), mesh)
            runs["jax_no_cache"].append({**plain.summary(len(requests)), "load_1min_before": load})
            common.progress(f"jax_no_cache {done}: {plain.seconds:.1f} s")
            check["jax_vs_jax_no_cache"] = common.weight_diff(cached.weight, plain.weight, base)
        for variant, threads in torch_variants.items():
            if threads is not None:
                torch_reference.torch.set_num_threads(threads)
            with torch_reference.torch.no_grad():
                torch_reference.down_proj(torch_model, args.layer).copy_(original)
            load = os.getloadavg()[0]
            ref = torch_reference.train(
                torch_model, model.tokenizer, requests, args.layer, epochs=args.epochs,
                batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            )
            rates = common.epoch_rates(len(requests), ref.seconds, ref.epoch_seconds)
            runs[variant].append({**rates, "losses": ref.losses, "threads": threads, "load_1min_before": load})
            common.progress(f"{variant} {done}: {ref.seconds:.1f} s")
            check[f"jax_vs_{variant}"] = common.weight_diff(cached.weight, ref.weight, base)
        checks.append(check)

    return {
        "model": common.model_source(args),
        "edits": len(requests),
        "epochs": args.epochs,
        "config": config.to_dict(),
        "threads": {"torch": args.torch_threads if torch_variants and args.torch_device == "cpu" else None,
                    "xla": "XLA:CPU default: its intra-op thread pool uses every core"
                    if mesh.devices.flat[0].platform == "cpu" else str(mesh.devices.flat[0])},
        "runs": runs,
        "medians": {v: _medians(r) for v, r in runs.items()},
        "ratios": _ratios(runs),
        "weight_checks": checks,
    }


def _torch_variants(args: argparse.Namespace) -> dict[str, int | None]:
    """Variant name → torch CPU threads (one run each); on an accelerator one run, threads unset."""
    if args.torch_device != "cpu":
        return {f"torch_{args.torch_device}": None}
    return {f"torch_threads{n}": n for n in args.torch_threads}


def _base_weight(model, config) -> np.ndarray:
    from locft_jax.engine.locations import resolve_location, trainable_names
    from locft_jax.params import flatten

    name = trainable_names(model.config, resolve_location(model.config, config.layers, config.module))[0]
    return np.asarray(flatten(model.params)[name], np.float64)


def _torch_model(args: argparse.Namespace, model):
    from experiments.bench import torch_reference

    if args.random_shape:
        return torch_reference.torch_model_from_params(model.config, model.params, args.dtype, args.torch_device)
    return torch_reference.load_torch_model(common.model_source(args), args.dtype, args.torch_device)


MEDIAN_KEYS = (
    "seconds", "first_epoch_seconds", "steady_epoch_seconds", "edit_epochs_per_s", "steady_edit_epochs_per_s",
    "setup_seconds", "compile_seconds",
)


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: common.median([r.get(k) for r in runs]) for k in MEDIAN_KEYS if any(k in r for r in runs)}


def _best_torch(medians: dict[str, dict[str, Any]], key: str) -> tuple[str, float] | None:
    """The fastest torch variant by ``key``: jax is compared with the reference at its best."""
    found = [(v, m[key]) for v, m in medians.items() if v.startswith("torch") and m.get(key)]
    return max(found, key=lambda x: x[1]) if found else None


def _ratios(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """jax / fastest-torch edit-epochs/s, from the medians, whole call and steady state."""
    medians = {v: _medians(r) for v, r in runs.items()}
    out: dict[str, Any] = {}
    for key in ("edit_epochs_per_s", "steady_edit_epochs_per_s"):
        best = _best_torch(medians, key)
        if best is None:
            continue
        for variant in JAX_VARIANTS:
            if variant not in medians:
                continue
            mine = medians[variant].get(key)
            out[f"{variant}/{best[0]} {key}"] = mine / best[1] if mine else None
    return out


def table(results: dict[str, Any]) -> str:
    medians = results["medians"]
    best_all = _best_torch(medians, "edit_epochs_per_s")
    best_steady = _best_torch(medians, "steady_edit_epochs_per_s")
    rows = []
    for variant, med in medians.items():
        rows.append([
            variant, med["edit_epochs_per_s"], med.get("steady_edit_epochs_per_s"),
            med["edit_epochs_per_s"] / best_all[1] if best_all else None,
            med["steady_edit_epochs_per_s"] / best_steady[1] if best_steady and med.get("steady_edit_epochs_per_s")
            else None,
            med["seconds"], med.get("first_epoch_seconds"), med.get("steady_epoch_seconds"),
            med.get("setup_seconds"), med.get("compile_seconds"),
        ])
    head = (
        f"{results['edits']} edits × {results['epochs']} epochs, {results['model']}, "
        f"medians of {len(results['runs']['jax'])} repeats"
    )
    lines = [head, "", common.markdown_table(
        ["implementation", "edit-epochs/s (whole call)", "edit-epochs/s (steady)", "× fastest torch (whole)",
         "× fastest torch (steady)", "call s", "epoch 1 s", "later epoch s", "setup s", "compile s"],
        rows,
    ), ""]
    for key in sorted({k for c in results["weight_checks"] for k in c}):
        diffs = [c[key] for c in results["weight_checks"]]
        lines.append(
            f"trained weights, {key.replace('_vs_', ' vs ')}: max abs diff {max(d['max_abs_diff'] for d in diffs):.2e}"
            f" ({max(d['entries_over_1e-4'] for d in diffs)} entries > 1e-4), update relative diff "
            f"{max(d['update_rel_diff'] for d in diffs):.2e} (largest update entry {diffs[0]['update_max_abs']:.2e})"
        )
    return "\n".join(lines)
