"""Command-line options shared by the experiments: model, data, preset, ``--set key=value``."""

from __future__ import annotations

import argparse
import ast
import dataclasses
from pathlib import Path
from typing import Any

from experiments.pipeline import EVAL_STYLES
from experiments.presets import NONE
from locft_jax.engine import EditConfig
from locft_jax.evaluate.unrelated import Fact, load_facts

DEFAULT_DATA = Path(__file__).parent / "data" / "country_capitals.json"
DEFAULT_FACTS = Path(__file__).parent / "data" / "general_facts.json"


def add_model_data_options(parser: argparse.ArgumentParser, default_edits: int | None = None) -> None:
    parser.add_argument("--model", help="HF model dir, .gguf file or convert.from_hf dir (default: embedded SmolLM2)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="edit requests: file, glob or hub name")
    parser.add_argument("--format", default="auto", help="data format (auto-detected by default)")
    parser.add_argument("--edits", type=positive_int, default=default_edits, help="use the first N requests")
    parser.add_argument("--skip-invalid", action="store_true", help="skip malformed records instead of failing")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_scoring_options(parser: argparse.ArgumentParser) -> None:
    """Which styles score the edits, and how many of the edited requests."""
    parser.add_argument("--styles", nargs="+", default=list(EVAL_STYLES), choices=EVAL_STYLES,
                        help="scoring styles (default: both)")
    parser.add_argument("--eval-sample", type=positive_int,
                        help="score a fixed-seed sample of at most N edited requests (default: all)")


def add_facts_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--general-facts", default=str(DEFAULT_FACTS),
        help="general facts (JSON list of prompt/answer) scored before and after as unrelated locality; '' for none",
    )


def load_job_facts(args: argparse.Namespace) -> list[Fact]:
    return load_facts(args.general_facts) if args.general_facts else []


def add_edit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="hyperparameter preset (default: by the model's shape)")
    parser.add_argument("--layer", type=int, nargs="+", dest="layers")
    parser.add_argument("--module", choices=("layer", "attn", "mlp", "mlp_down", "mlp_up"))
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--pipeline", choices=("bf", "df"))
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="any EditConfig field, e.g. --set early_stop_loss=0 (repeatable)",
    )


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["lr=1e-3", "layers=(3, 4)"]`` → typed values (Python literals, else strings; None as
    ``presets.NONE``, so that it replaces the preset's value)."""
    fields = {f.name for f in dataclasses.fields(EditConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        if key not in fields:
            raise ValueError(f"--set {key}: unknown field; valid: {', '.join(sorted(fields))}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        value = NONE if value is None else value  # None given is a value, not "not given"
        if key in out:
            _agree(f"--set {key}=", out[key], f"--set {key}=", value, key)
        out[key] = value
    return out


FLAGS = {"layers": "--layer", "module": "--module", "epochs": "--epochs", "batch_size": "--batch-size",
         "lr": "--lr", "pipeline": "--pipeline"}


def edit_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The EditConfig fields given on the command line: flags and ``--set`` (two values for one
    field that differ are an error)."""
    flags = {k: getattr(args, k, None) for k in FLAGS}
    if flags["layers"] is not None:
        flags["layers"] = tuple(flags["layers"])
    sets = parse_sets(args.set)
    for key, value in sets.items():
        if flags.get(key) is not None:
            _agree(f"{FLAGS[key]} ", flags[key], f"--set {key}=", value, key)
    return {**{k: v for k, v in flags.items() if v is not None}, **sets}


def _agree(first: str, a: Any, second: str, b: Any, key: str) -> None:
    a, b = _normal(key, a), _normal(key, b)
    if a != b:
        raise ValueError(f"{first}{a!r} and {second}{b!r} disagree; give {key} once")


def _normal(key: str, value: Any) -> Any:
    """``value`` as EditConfig holds it (``[3]`` and ``3`` as ``(3,)`` for layers), to compare two given values."""
    value = None if value is NONE else value
    try:
        return getattr(EditConfig(**{key: value}), key)
    except ValueError:  # an invalid value: compared as given, and named later by EditConfig
        return value
