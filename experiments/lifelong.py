"""``python -m experiments.run lifelong``: N edits (default 3000) arriving in data order, vs FT-M depth-first.

LocFT-BF trains all ``--edits`` requests breadth-first, at once as the reference code does, or,
with ``--buffer B``, as they arrive B at a time: each buffer trained breadth-first on the model the
previous one left (fresh optimizer state; ``--replay``: with every earlier edit again). The
baseline (skip it with ``--no-baseline``) trains FT-M depth-first, one request to convergence
after another, in data order. Every variant is scored once, after its last edit, on all the edits
(or ``--eval-sample``'s fixed sample of them). When the data set holds fewer requests than asked,
the rest are synthetic facts ("The favourite food of person #123 is" → "sushi",
``sweep.synthetic_requests``, fixed seed). Both scoring styles, time per edit, and a plot of
reliability by the edit's position in the data: the early edits are the ones later edits overwrite.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from experiments import plots
from experiments.cli_options import positive_int
from experiments.sweep import METRICS, Variant, add_sweep_options, start
from locft_jax.engine import EditResult, edit
from locft_jax.evaluate import EvalResult
from locft_jax.loading import Model
from locft_jax.requests import EditRequest

BINS = 20
STYLES = {"reliability_tf": "teacher-forced", "reliability_gen": "generation"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sweep_options(parser, default_edits=3000)
    parser.add_argument("--no-baseline", action="store_true", help="skip the FT-M depth-first baseline")
    parser.add_argument("--buffer", type=positive_int,
                        help="LocFT-BF: the edits arrive this many at a time, each buffer trained on the model the "
                             "previous one left (default: all at once)")
    parser.add_argument("--replay", action="store_true", help="with --buffer: each buffer replays every earlier edit")


@dataclasses.dataclass(frozen=True)
class BufferedVariant(Variant):
    """A breadth-first variant whose requests arrive ``buffer`` at a time, in order (0: all at once)."""

    buffer: int = 0
    replay: bool = False

    def to_json(self) -> dict:
        return {**super().to_json(), "buffer": self.buffer or None, "replay": self.replay}

    def edit(self, model: Model, requests: list[EditRequest]) -> EditResult:
        if not self.buffer or self.buffer >= len(requests):
            return super().edit(model, requests)
        results = []
        for k, start_at in enumerate(range(0, len(requests), self.buffer)):
            arrived = requests[0 if self.replay else start_at : start_at + self.buffer]
            result = edit(model, arrived, self.config)
            model = model.with_params(result.params)  # the next buffer starts from this one's edit
            results.append(dataclasses.replace(result, log=[{"buffer": k, **e} for e in result.log]))
        last = results[-1]
        return dataclasses.replace(
            last, log=[e for r in results for e in r.log], compiles=sum(r.compiles for r in results),
            seconds=sum(r.seconds for r in results), cache_bytes=max(r.cache_bytes for r in results),
            skipped_records=[s for r in results for s in r.skipped_records],
        )


def binned_means(values: list[float | None], bins: int = BINS) -> tuple[list[float], list[float | None]]:
    """(centre position, mean of the scored values) of up to ``bins`` equal runs of ``values``."""
    centres, means = [], []
    for chunk in np.array_split(np.arange(len(values)), min(bins, len(values))):
        scored = [values[i] for i in chunk if values[i] is not None]
        centres.append(float(chunk.mean()))
        means.append(float(np.mean(scored)) if scored else None)
    return centres, means


def run(args: argparse.Namespace) -> int:
    job = start(args, "lifelong", total_edits=args.edits)
    if args.replay and not args.buffer:
        raise ValueError("--replay replays earlier buffers: give --buffer too")
    label = "LocFT-BF" + (f", buffers of {args.buffer}" if args.buffer else "") + (", replay" if args.replay else "")
    runs = [BufferedVariant(label, job.base.replace(pipeline="bf"),
                            {"pipeline": "bf", "objective": job.base.objective, "buffer": args.buffer},
                            buffer=args.buffer or 0, replay=args.replay)]
    if not args.no_baseline:
        runs.append(Variant("FT-M depth-first", job.base.replace(pipeline="df", objective="ft-m"),
                            {"pipeline": "df", "objective": "ft-m"}))
    job.save_config(runs)

    def by_position(variant: Variant, evaluation: EvalResult) -> dict:
        """Binned reliability by position, per scoring style: part of the row, so a kept row keeps it."""
        binned = {}
        for key, style in STYLES.items():
            values = [row["metrics"].get(METRICS[key]) for row in evaluation.per_request]
            if any(v is not None for v in values):
                binned[style] = binned_means(values)
        return {"reliability_by_position": binned}

    rows = job.run(runs, pre_row={}, on_evaluated=by_position)
    x: list[float] = []  # the bins' centre positions: the same for every variant (one set of scored edits)
    series: dict[str, list[float | None]] = {}
    for row in rows[1:]:
        for style, (centres, means) in row.get("reliability_by_position", {}).items():
            x, series[f"{row['run']}, {style}"] = centres, means
    figure = plots.line_panels(job.run_dir / "reliability_by_position.png", x, {"reliability": series},
                               "edit position (the depth-first training order)",
                               f"{len(job.requests)} edits: reliability by position", fractions=["reliability"])
    job.finish(rows, ["pipeline", "objective", "buffer"], [figure])
    return 0
