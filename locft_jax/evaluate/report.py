"""Writing an ``EvalResult``: ``metrics.json``, ``metrics.md`` and ``per_request.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

from locft_jax.evaluate.edits import EvalResult
from locft_jax.evaluate.metrics import LABELS, Metric, is_share
from locft_jax.files import write_text_atomic


def metrics_json(result: EvalResult) -> dict:
    """Every metric (pre and post), its counts and meaning, and the evaluation settings."""
    names = sorted(set(result.post) | set(result.pre or {}))
    return {
        "settings": result.settings,
        "post": {k: v.to_json() for k, v in sorted(result.post.items())},
        "pre": None if result.pre is None else {k: v.to_json() for k, v in sorted(result.pre.items())},
        "descriptions": {k: LABELS.get(k, "") for k in names},
    }


def _cell(name: str, m: Metric | None) -> str:
    if m is None or m.value is None:
        return "–"
    return f"{100 * m.value:.1f}%" if is_share(name) else f"{m.value:.4g}"


def markdown_table(result: EvalResult) -> str:
    """One row per metric: pre, post, counts and what it measures."""
    pre = result.pre or {}
    lines = [
        "| metric | pre-edit | post-edit | count | prompts | meaning |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name in sorted(set(result.post) | set(pre)):
        m = result.post.get(name) or pre[name]
        lines.append(
            f"| {name} | {_cell(name, pre.get(name))} | {_cell(name, result.post.get(name))} | {m.count} | {m.prompts} "
            f"| {LABELS.get(name, '')} |"
        )
    return "\n".join(lines) + "\n"


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """One JSON object per line (UTF-8, not escaped)."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_report(result: EvalResult, out_dir: str | Path) -> dict[str, Path]:
    """Write the three files into ``out_dir`` (created); returns their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = {"metrics": "metrics.json", "markdown": "metrics.md", "per_request": "per_request.jsonl"}
    paths = {kind: out / name for kind, name in names.items()}
    write_text_atomic(paths["metrics"], json.dumps(metrics_json(result), indent=2) + "\n")
    write_text_atomic(paths["markdown"], markdown_table(result))
    write_jsonl(paths["per_request"], result.per_request)
    return paths
