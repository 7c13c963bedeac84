"""``bench scale``: time per edit and peak host memory as the number of edits grows.

Synthetic facts ("The favourite colour of person #123 is" → a random colour, fixed seed), each
size in its own process so that its peak resident memory (``ru_maxrss``) is its own. Time per
edit should stay flat: every step has the same shape, the prefix cache grows linearly. On an
accelerator the first device's peak memory in use is reported too.
"""

from __future__ import annotations

import argparse
from typing import Any

from experiments.bench import common
from experiments.bench.worker import run_in_subprocess

SIZES = (1_000, 10_000)
LARGE = 100_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser, edits=None, epochs=2, repeats=1)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="numbers of edits (default 1K 10K)")
    parser.add_argument("--include-100k", action="store_true", help="also run 100K edits")
    parser.add_argument("--size-epochs", type=int, nargs="+", default=None,
                        help="epochs per size, in --sizes order (default: --epochs for every size)")


def run(args: argparse.Namespace) -> int:
    started = common.started_record()
    sizes = list(args.sizes) + ([LARGE] if args.include_100k and LARGE not in args.sizes else [])
    epochs = list(args.size_epochs or [])
    epochs += [args.epochs] * (len(sizes) - len(epochs))
    runs = []
    for n, n_epochs in zip(sizes, epochs, strict=False):
        options = {k: v for k, v in vars(args).items() if k != "func"} | {"epochs": n_epochs}
        for _ in range(args.repeats):
            runs.append(run_in_subprocess("experiments.bench.scale.measure_size", {"options": options, "n": n}))
    results = {"model": common.model_source(args), "sizes": sizes, "epochs": epochs, "runs": runs}
    common.write_results(args, "scale", results, table(results), started)
    return 0


def measure_size(options: dict[str, Any], n: int) -> dict[str, Any]:
    """One size, in this (fresh) process: load, edit ``n`` synthetic facts, report time and memory."""
    args = argparse.Namespace(**options)
    mesh = common.single_device_mesh()
    model = common.load_bench_model(args, mesh)
    rss_loaded = common.rss_bytes()
    requests = common.synthetic_requests(n, args.seed)
    run = common.timed_edit(model, requests, common.edit_config(args), mesh)
    summary = run.summary(n)
    steady = summary["steady_epoch_seconds"]
    return {
        "edits": n,
        **summary,
        "ms_per_edit_epoch_steady": 1e3 * steady / n if steady else None,
        "ms_per_edit_epoch_train_excl_compile": 1e3 / summary["train_edit_epochs_per_s_excl_compile"],
        "ms_per_edit_epoch_whole_call": 1e3 * run.seconds / (n * len(run.epoch_seconds)),
        "rss_after_load_bytes": rss_loaded,
        "peak_rss_bytes": common.peak_rss_bytes(),
        "peak_device_bytes": common.device_peak_bytes(),
    }


def table(results: dict[str, Any]) -> str:
    mib = 2**20
    rows = [
        [r["edits"], len(r["epoch_seconds"]), r["ms_per_edit_epoch_train_excl_compile"], r["ms_per_edit_epoch_steady"],
         r["ms_per_edit_epoch_whole_call"],
         r["seconds"], r["setup_seconds"], r["compile_seconds"], r["cache_bytes"] / mib,
         r["rss_after_load_bytes"] / mib, r["peak_rss_bytes"] / mib,
         r["peak_device_bytes"] / mib if r.get("peak_device_bytes") else None]
        for r in results["runs"]
    ]
    return "\n".join([
        f"synthetic edits, {results['model']}",
        "",
        common.markdown_table(
            ["edits", "epochs", "ms/edit-epoch (training, compile excluded)", "ms/edit-epoch (later epochs)",
             "ms/edit-epoch (whole call)", "call s", "setup s",
             "compile s", "prefix cache MiB", "RSS after load MiB", "peak RSS MiB",
             "peak device MiB"],
            rows,
        ),
    ])
