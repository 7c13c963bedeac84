"""``python -m experiments.run bench SUB ...``: speed, roofline, scale, devices and generate benchmarks.

Each sub-command is a module of this package with ``add_arguments(parser)`` and ``run(args)``;
each prints a markdown table and writes ``results.json`` (command, machine, date, versions).
Results are recorded in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import importlib

SUB_COMMANDS = {
    "speed": "locft-jax edit (prefix cache on/off) vs a PyTorch reference: edit-epochs/s, compile time, weight parity",
    "roofline": "FLOPs per edit-epoch, achieved FLOP/s, and the ratio to a measured matmul peak",
    "scale": "time per edit and peak host memory for 1K / 10K (/ 100K) synthetic edits",
    "devices": "1 vs 8 simulated CPU devices: equal trained weights, time",
    "generate": "greedy scoring generation, locft-jax vs transformers generate: prompts/s, same tokens",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    subs = parser.add_subparsers(dest="sub", required=True, metavar="SUB")
    for name, help_text in SUB_COMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text)
        _module(name).add_arguments(sub)


def run(args: argparse.Namespace) -> int:
    return _module(args.sub).run(args)


def _module(name: str):
    return importlib.import_module(f"experiments.bench.{name}")
