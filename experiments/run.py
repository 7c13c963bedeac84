"""``python -m experiments.run [NAME] [options]``: the main job and every named experiment.

With no NAME it runs the demo on the embedded default model (SmolLM2-135M-Instruct).
Each experiment is a module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

EXPERIMENTS = {
    "default": ("experiments.default", "the demo: real counterfactual edits on the embedded SmolLM2, end to end"),
    "edit": ("experiments.edit", "one edit run with every knob; writes config, log, metrics and optionally hf/"),
    "df-vs-bf": ("experiments.df_vs_bf", "the pipeline table: FT-L / FT-M / LoRA, depth-first vs breadth-first"),
    "locations": ("experiments.locations", "location sweep: every layer x module, heatmaps (paper Fig. 5)"),
    "batch-size": ("experiments.batch_size", "batch-size ablation, line plot (paper Fig. 4)"),
    "lifelong": ("experiments.lifelong", "N sequential edits (default 3000), both scoring styles, vs FT-M depth-first"),
    "scaling": ("experiments.scaling", "edit volume 1K..100K: reliability, capability, time per edit vs N"),
    "quality": ("experiments.quality", "plain recipe vs each quality option, two relations"),
    "bench": ("experiments.bench", "speed / roofline / scale / devices benchmarks"),
}


def enable_compile_cache() -> None:
    """Keep XLA's compiled programs on disk, so a second run of the same shapes skips compiling.

    ``LOCFT_COMPILE_CACHE`` names the directory (default ``~/.cache/locft-jax/xla``; empty: off).
    """
    path = os.environ.get("LOCFT_COMPILE_CACHE", str(Path.home() / ".cache" / "locft-jax" / "xla"))
    if path:
        import jax

        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv.pop(0) if argv and not argv[0].startswith("-") else "default"
    if name not in EXPERIMENTS:
        print(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}", file=sys.stderr)
        return 2
    module_name, help_text = EXPERIMENTS[name]
    parser = argparse.ArgumentParser(prog=f"python -m experiments.run {name}", description=help_text)
    module = importlib.import_module(module_name)
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    from experiments.errors import run_with_clear_errors
    from locft_jax.hosts import init_distributed

    def job(args: argparse.Namespace) -> int:
        init_distributed()  # a multi-host run is joined before anything touches a device
        enable_compile_cache()
        return module.run(args)

    return run_with_clear_errors(job, args)


if __name__ == "__main__":
    sys.exit(main())
