"""What every benchmark shares: arguments, the model and edits, one timed ``edit``, the results file.

A benchmark is honest only if both sides do the same work, so the edit requests, the
hyperparameters (thresholds 0: every run trains every epoch) and the batches are fixed here once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from locft_jax.files import write_text_atomic
from locft_jax.requests import EditRequest

REPO = Path(__file__).resolve().parents[2]
COUNTRY_CAPITALS = REPO / "experiments" / "data" / "country_capitals.json"

# Random-parameter models for timing shapes we cannot download here. ``vocab_size`` is raised to
# the tokenizer's size when smaller, so every request's ids exist in the embedding table.
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
    ),
    # for smoke tests of the --random-shape path
    "tiny": dict(
        model_type="llama", vocab_size=0, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
    ),
}

SYNTHETIC_WORDS = (
    "red", "blue", "green", "yellow", "purple", "orange", "black", "white", "silver", "golden",
    "crimson", "teal", "violet", "indigo", "amber", "scarlet", "ivory", "olive", "maroon", "navy",
    "turquoise", "beige", "coral", "lavender", "magenta", "ochre", "pink", "brown", "grey", "cyan",
)


def add_model_arguments(parser: argparse.ArgumentParser, edits: int | None, epochs: int, repeats: int) -> None:
    """The options every sub-command takes (defaults: the issue's SmolLM2 layer-20 setting)."""
    parser.add_argument("--model", default=None, help="HF dir, .gguf or locft checkpoint (default: embedded SmolLM2)")
    parser.add_argument("--random-shape", choices=sorted(RANDOM_SHAPES), default=None,
                        help="random params of this shape instead of --model (SmolLM2 tokenizer)")
    parser.add_argument("--tokenizer", default=None,
                        help="--random-shape's tokenizer: an HF tokenizer directory (default: the embedded SmolLM2's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    if edits is not None:
        parser.add_argument("--edits", type=int, default=edits)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--layer", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="results directory (default: runs/bench-<sub>-<time>/)")


# ----------------------------------------------------------------------------- edits


def country_requests(n: int) -> list[EditRequest]:
    """The first ``n`` country-capital counterfactuals; past the file's end, numbered variants."""
    records = json.loads(COUNTRY_CAPITALS.read_text())
    out = []
    for i in range(n):
        rec = records[i % len(records)]
        cycle = i // len(records)
        prompt = rec["prompt"] if cycle == 0 else f"Fact {cycle}: {rec['prompt']}"
        out.append(EditRequest(prompt=prompt, target_new=rec["target_new"]))
    return out


def synthetic_requests(n: int, seed: int = 0) -> list[EditRequest]:
    """``n`` distinct made-up facts with random one-word answers (fixed ``seed``)."""
    words = np.random.default_rng(seed).integers(len(SYNTHETIC_WORDS), size=n)
    return [
        EditRequest(prompt=f"The favourite colour of person #{i} is", target_new=SYNTHETIC_WORDS[w])
        for i, w in enumerate(words)
    ]


def edit_config(args: argparse.Namespace, **changes: Any):
    """LocFT-BF at ``--layer`` mlp_down; skip/early-stop thresholds 0 so every run does equal work."""
    from locft_jax.engine import EditConfig

    base = EditConfig(
        layers=(args.layer,), module="mlp_down", lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
        skip_step_loss=0.0, early_stop_loss=0.0, seed=args.seed,
    )
    return base.replace(**changes)


# ----------------------------------------------------------------------------- model


def model_source(args: argparse.Namespace) -> str:
    if args.random_shape:
        return f"random:{args.random_shape}"
    if args.model:
        return str(args.model)
    from convert.embedded import smollm2_gguf_path

    return str(smollm2_gguf_path())


def load_bench_model(args: argparse.Namespace, mesh=None):
    """The locft-jax ``Model`` named by ``--model`` / ``--random-shape`` in ``--dtype``."""
    import jax
    import jax.numpy as jnp

    from locft_jax.loading import Model, load_model

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    if not args.random_shape:
        return load_model(model_source(args), dtype=dtype, mesh=mesh)
    from locft_jax.config import ModelConfig
    from locft_jax.params import init_random, tensor_specs, unflatten
    from locft_jax.sharding import make_mesh, param_shardings

    tokenizer = bench_tokenizer(args)
    shape = dict(RANDOM_SHAPES[args.random_shape])
    shape["vocab_size"] = max(shape["vocab_size"], len(tokenizer))
    config = ModelConfig(**shape, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    # drawn in place on the mesh: edit() keeps params already on the mesh's devices as they are
    shapes = {name: jax.ShapeDtypeStruct(spec.shape, dtype) for name, spec in tensor_specs(config).items()}
    shardings = param_shardings(config, unflatten(shapes, config), mesh or make_mesh())
    params = init_random(config, args.seed, dtype, shardings=shardings)
    return Model(config, params, tokenizer, source=f"random:{args.random_shape}")


def bench_tokenizer(args: argparse.Namespace):
    """``--tokenizer`` (an HF tokenizer directory), else the embedded SmolLM2's."""
    if args.tokenizer:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(args.tokenizer)
    from convert.embedded import smollm2_gguf_path
    from convert.sources import open_checkpoint

    return open_checkpoint(smollm2_gguf_path()).load_tokenizer()


def single_device_mesh():
    """The benchmarks (except ``devices``) time one device, whatever XLA_FLAGS simulate."""
    import jax

    from locft_jax.sharding import make_mesh

    return make_mesh(1, jax.devices()[:1])


# ----------------------------------------------------------------------------- timing


@dataclasses.dataclass
class JaxRun:
    """One timed ``edit`` call. ``seconds``: all of ``edit`` (tokenize, prefix cache, compile, train)."""

    seconds: float
    epoch_seconds: list[float]
    compile_seconds: float  # trace + lower + XLA compile anywhere inside this call (jax.monitoring)
    epoch_compile_seconds: list[float]  # the part of it that fell inside each epoch (the step's compiles)
    compiles: int
    cache_bytes: int
    losses: list[float]
    weight: np.ndarray  # the trained tensor, float32

    @property
    def train_seconds(self) -> float:
        return sum(self.epoch_seconds)

    @property
    def setup_seconds(self) -> float:
        return self.seconds - self.train_seconds

    def summary(self, n_edits: int) -> dict[str, Any]:
        train_no_compile = self.train_seconds - sum(self.epoch_compile_seconds)
        return {
            **epoch_rates(n_edits, self.seconds, self.epoch_seconds),
            "setup_seconds": self.setup_seconds,
            "compile_seconds": self.compile_seconds,
            "epoch_compile_seconds": self.epoch_compile_seconds,
            "train_edit_epochs_per_s_excl_compile": n_edits * len(self.epoch_seconds) / train_no_compile,
            "compiles": self.compiles,
            "cache_bytes": self.cache_bytes,
            "losses": self.losses,
        }


def epoch_rates(n_edits: int, total_seconds: float, epoch_seconds: Sequence[float]) -> dict[str, Any]:
    """Edit-epochs/s over the whole call and in steady state (median of epochs after the first)."""
    later = list(epoch_seconds[1:])
    steady = statistics.median(later) if later else None
    return {
        "seconds": total_seconds,
        "epoch_seconds": list(epoch_seconds),
        "first_epoch_seconds": epoch_seconds[0],
        "steady_epoch_seconds": steady,
        "edit_epochs_per_s": n_edits * len(epoch_seconds) / total_seconds,
        "steady_edit_epochs_per_s": n_edits / steady if steady else None,
    }


@contextlib.contextmanager
def compile_timer() -> Iterator[list[tuple[float, float]]]:
    """Collects ``(end time, duration)`` of JAX's trace/lower/compile events while the block runs."""
    import jax.monitoring

    events: list[tuple[float, float]] = []
    names = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    )

    def listener(event: str, seconds: float, **_: Any) -> None:
        if event in names:
            events.append((time.perf_counter(), seconds))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def timed_edit(model, requests: Sequence[EditRequest], config, mesh=None) -> JaxRun:
    import jax

    from locft_jax.engine import edit

    epoch_ends: list[float] = []
    with compile_timer() as events:
        t0 = time.perf_counter()
        result = edit(model, requests, config, mesh=mesh, on_epoch=lambda _: epoch_ends.append(time.perf_counter()))
        weight = np.asarray(jax.device_get(next(iter(result.trainable.values()))), np.float32)
        seconds = time.perf_counter() - t0
    epoch_seconds = [e["seconds"] for e in result.log]
    windows = zip(epoch_ends, epoch_seconds, strict=True)
    in_epoch = [sum(d for t, d in events if end - length <= t <= end) for end, length in windows]
    return JaxRun(
        seconds=seconds,
        epoch_seconds=epoch_seconds,
        compile_seconds=sum(d for _, d in events),
        epoch_compile_seconds=in_epoch,
        compiles=result.compiles,
        cache_bytes=result.cache_bytes,
        losses=[e["loss"] for e in result.log],
        weight=weight,
    )


def weight_diff(a: np.ndarray, b: np.ndarray, base: np.ndarray) -> dict[str, float]:
    """Max abs difference of two trained tensors, and of their updates relative to the update size."""
    da, db = a.astype(np.float64) - base, b.astype(np.float64) - base
    return {
        "max_abs_diff": float(np.abs(a.astype(np.float64) - b).max()),
        "update_rel_diff": float(np.linalg.norm(da - db) / max(np.linalg.norm(da), 1e-30)),
        "update_max_abs": float(np.abs(da).max()),
        # Adam divides by sqrt(v) + 1e-8: an entry whose gradient is ~1e-8 moves by up to lr on float32
        # rounding alone, so a few large entry differences are expected; this counts them
        "entries_over_1e-4": int((np.abs(da - db) > 1e-4).sum()),
    }


def progress(message: str) -> None:
    """One line on stderr as a benchmark goes, so a run cut off by a time limit shows how far it got."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


# ----------------------------------------------------------------------------- reporting


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("jax", "jaxlib", "torch", "transformers", "numpy", "optax"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def machine() -> dict[str, Any]:
    import jax

    return {
        "processor": platform.processor(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "jax_devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average": list(os.getloadavg()),
    }


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def device_peak_bytes() -> int | None:
    """Peak memory in use on the first accelerator since the process started; None on CPU or when unreported."""
    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    return stats.get("peak_bytes_in_use") if stats else None


def rss_bytes() -> int:
    with contextlib.suppress(ImportError):
        import psutil

        return psutil.Process().memory_info().rss
    return peak_rss_bytes()


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        if x is None:
            return "–"
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1e4 else f"{x:,.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def out_dir(args: argparse.Namespace, sub: str) -> Path:
    if args.out:
        return Path(args.out)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return REPO / "runs" / f"bench-{sub}-{stamp}"


def write_results(args: argparse.Namespace, sub: str, results: dict[str, Any], table: str,
                  started: dict[str, Any]) -> Path:
    """Print the table; write ``results.json`` (with command, machine, date, versions) and ``table.md``."""
    out = out_dir(args, sub)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": command_line(args, sub),
        "sub_command": sub,
        "arguments": {k: v for k, v in vars(args).items() if k != "func"},
        "date": started["date"],
        "machine": started["machine"],
        "load_average_at_end": list(os.getloadavg()),
        "versions": versions(),
        "results": results,
    }
    write_text_atomic(out / "results.json", json.dumps(record, indent=1, default=_jsonable) + "\n")
    write_text_atomic(out / "table.md", table + "\n")
    print(table)
    print(f"\nresults: {out / 'results.json'}")
    return out


def command_line(args: argparse.Namespace, sub: str) -> str:
    """The command that reproduces this run (every option spelled out)."""
    parts = ["python -m experiments.run bench", sub]
    for key, value in vars(args).items():
        flag = "--" + key.replace("_", "-")
        if key in ("sub", "func") or value is None or value is False:
            continue
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return " ".join(parts)


def started_record() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")
