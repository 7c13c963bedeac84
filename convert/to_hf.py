"""Export params to a Hugging Face model directory that transformers loads as the same model.

    python -m convert.to_hf CKPT OUT [--base SRC] [--only-changed] [--dtype float32|bfloat16|float16]
                                     [--max-shard-bytes N] [--overwrite]

CKPT is anything ``open_checkpoint`` reads (a ``convert.from_hf`` directory, an HF directory, a
GGUF file). OUT gets ``config.json``, the tokenizer files, ``generation_config.json`` when the
base (or CKPT) has one, and ``model.safetensors`` or shards + ``model.safetensors.index.json``
with exactly the tensors transformers expects for the config (a tied model has no ``lm_head``).

``--base`` an HF safetensors directory of the same model: shards whose tensors are all unchanged
are copied as they are; only shards holding a changed tensor are rewritten (same order, names).
``--only-changed`` (needs ``--base``: HF dir, GGUF or ``from_hf`` dir): OUT gets only the tensors
that differ, as ``patch.safetensors`` + ``patch.json``; ``python -m convert.patch apply`` turns it
into the full directory.

Memory: tensors are gathered to the host and written one at a time (a tensor sharded over many
devices is gathered first), so the host holds at most one tensor beyond the params.

Multi-host (``locft_jax.hosts``): every process calls ``export_hf``; process 0 alone writes. Tensors
split over several hosts are gathered first by all processes together (then the host holds all of
those at once); replicated ones are read from the local copy, with no communication.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from convert.atomic import atomic_output_dir, check_output_dir
from convert.cli import EXPORT_DTYPES, read_params, run_cli, source_dtype
from convert.errors import CheckpointError
from convert.hf_reader import INDEX_NAME, SINGLE_NAME, HFTensors
from convert.orbax_io import is_locft_checkpoint
from convert.patch import make_patch, same_bits, write_over_base
from convert.safetensors_io import write_safetensors_streaming
from convert.sources import open_checkpoint, resolve_source
from locft_jax.config import ModelConfig
from locft_jax.hosts import is_primary
from locft_jax.params import Params, flatten, tensor_specs

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default, "5GB"
GENERATION_CONFIG = "generation_config.json"

Layout = dict[str, tuple[np.dtype, tuple[int, ...]]]


def to_host(x: Any) -> np.ndarray:
    """One tensor as a host numpy array, gathered first if it is sharded over this host's devices.

    A tensor split over several hosts is refused: every process must gather it (``gather_across_hosts``).
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            raise ValueError("tensor is split over several hosts: gather it on every process (gather_across_hosts)")
        x = x.addressable_data(0)
    return np.asarray(jax.device_get(x))


def gather_across_hosts(flat: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every tensor of ``flat`` that is split over several hosts, gathered; a collective: every
    process must call it, with the same names (it is empty in a single-process run)."""
    from jax.experimental import multihost_utils

    split = sorted(
        n for n, x in flat.items()
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated)
    )
    return {n: np.asarray(multihost_utils.process_allgather(flat[n], tiled=True)) for n in split}


def hf_config_dict(config: ModelConfig, dtype: np.dtype) -> dict[str, Any]:
    """The ``config.json`` dict of an export: the model's HF config with its dtype and tying made explicit."""
    hf = config.to_hf_config()
    hf["tie_word_embeddings"] = config.tie_word_embeddings
    # transformers >= 4.56 reads "dtype", older versions "torch_dtype": keep whichever is there.
    keys = [key for key in ("dtype", "torch_dtype") if key in hf] or ["dtype"]
    for key in keys:
        hf[key] = np.dtype(dtype).name
    return hf


def write_config_json(directory: Path, config: ModelConfig, dtype: np.dtype) -> None:
    text = json.dumps(hf_config_dict(config, dtype), indent=2, sort_keys=True)
    (directory / "config.json").write_text(text + "\n")


def plan_shards(layout: Layout, max_shard_bytes: int) -> list[list[str]]:
    """Tensors in order, cut into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, (dtype, shape) in layout.items():
        nbytes = np.dtype(dtype).itemsize * int(np.prod(shape))
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_shards(out_dir: Path, layout: Layout, read: Callable[[str], np.ndarray], max_shard_bytes: int) -> None:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + index when it exceeds one shard."""
    shards = plan_shards(layout, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors_streaming(out_dir / SINGLE_NAME, layout, read)
        return
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_streaming(out_dir / file, {name: layout[name] for name in names}, read)
        weight_map.update(dict.fromkeys(names, file))
    total = sum(np.dtype(dtype).itemsize * int(np.prod(shape)) for dtype, shape in layout.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def write_over_hf_base(base_dir: Path, layout: Layout, read: Callable[[str], np.ndarray], out_dir: Path) -> bool:
    """Copy the shards of an HF base whose tensors are all unchanged, rewrite the others.

    Returns False (writing nothing) when the base is no HF safetensors directory with exactly our
    tensor names, shapes and dtypes; the caller then writes fresh shards.
    """
    if not base_dir.is_dir() or is_locft_checkpoint(base_dir):
        return False
    if not ((base_dir / SINGLE_NAME).exists() or (base_dir / INDEX_NAME).exists()):
        return False
    base = HFTensors(base_dir)
    if set(base.names()) != set(layout):
        return False
    if any(
        (base.dtype(name), base.shape(name)) != (np.dtype(dt), tuple(shape)) for name, (dt, shape) in layout.items()
    ):
        return False
    changed = [name for name in layout if not same_bits(read(name), base.read(name))]
    write_over_base(base, out_dir, read, changed)
    return True


def _params_layout(flat: dict[str, Any], config: ModelConfig, dtype: np.dtype | None) -> Layout:
    """Export dtype and shape of every tensor transformers expects, checked against the params."""
    specs = tensor_specs(config)
    missing = [name for name in specs if name not in flat]
    unexpected = [name for name in flat if name not in specs]
    if missing or unexpected:
        raise CheckpointError(
            f"params do not match the {config.model_type} config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    layout = {}
    for name, spec in specs.items():
        if tuple(flat[name].shape) != spec.shape:
            raise CheckpointError(f"param {name!r} has shape {tuple(flat[name].shape)}, config expects {spec.shape}")
        layout[name] = (np.dtype(flat[name].dtype if dtype is None else dtype), spec.shape)
    return layout


def export_hf(
    params: Params,
    config: ModelConfig,
    tokenizer: Any,
    out: str | Path,
    base: str | Path | None = None,
    only_changed: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: Any = None,
    overwrite: bool = False,
    generation_config: str | Path | None = None,
) -> Path:
    """Write ``params`` as an HF model directory ``out`` (atomically; see the module docstring).

    ``dtype`` casts every tensor (default: each keeps its params dtype). ``generation_config``:
    a ``generation_config.json`` to copy (default: the base's, if it has one). With
    ``only_changed``, ``out`` holds only the patch against ``base``. Multi-host: call it on every
    process; on all but process 0 it returns once the tensors split over hosts are gathered.
    """
    out = Path(out)
    flat = flatten(params)
    layout = _params_layout(flat, config, None if dtype is None else np.dtype(dtype))
    gathered = gather_across_hosts(flat)
    if not is_primary():
        return out

    def read(name: str) -> np.ndarray:
        host = gathered[name] if name in gathered else to_host(flat[name])
        return host.astype(layout[name][0], copy=False)

    if only_changed:
        if base is None:
            raise ValueError("only_changed needs a base checkpoint to compare with")
        base_ckpt = open_checkpoint(base)  # before OUT exists: a bad base leaves nothing behind
        with atomic_output_dir(out, overwrite) as tmp:
            make_patch(tmp, list(layout), read, base_ckpt.tensors, str(base))
        return out
    base_dir = Path(base) if base is not None else None
    if generation_config is None and base_dir is not None and (base_dir / GENERATION_CONFIG).is_file():
        generation_config = base_dir / GENERATION_CONFIG
    with atomic_output_dir(out, overwrite) as tmp:
        if base_dir is None or not write_over_hf_base(base_dir, layout, read, tmp):
            write_shards(tmp, layout, read, max_shard_bytes)
        write_config_json(tmp, config, layout["model.embed_tokens.weight"][0])
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if generation_config is not None:
            shutil.copyfile(generation_config, tmp / GENERATION_CONFIG)
    return out


def _generation_config_of(*paths: Path | None) -> Path | None:
    for path in paths:
        if path is not None and (path / GENERATION_CONFIG).is_file():
            return path / GENERATION_CONFIG
    return None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m convert.to_hf", description=__doc__.split("\n")[0])
    parser.add_argument("ckpt", type=Path, help="a convert.from_hf directory, an HF directory or a .gguf file")
    parser.add_argument("out", type=Path, help="the HF model directory to write")
    parser.add_argument(
        "--base", help="the unedited model (HF dir or cached hub name): shards to reuse, or to diff against"
    )
    parser.add_argument("--only-changed", action="store_true", help="write only the tensors that differ from --base")
    parser.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), help="export dtype (default: CKPT's)")
    parser.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES)
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    if args.only_changed and args.base is None:
        parser.error("--only-changed needs --base")
    check_output_dir(args.out, args.overwrite)  # before minutes of loading
    base = None if args.base is None else resolve_source(args.base)
    ckpt = open_checkpoint(args.ckpt)
    tokenizer = None if args.only_changed else ckpt.load_tokenizer()  # a patch has none; else before the weights
    dtype = EXPORT_DTYPES[args.dtype] if args.dtype else source_dtype(ckpt)
    params = read_params(ckpt, dtype, where=str(args.ckpt))
    generation_config = _generation_config_of(base, args.ckpt if args.ckpt.is_dir() else None)
    export_hf(
        params,
        ckpt.config,
        tokenizer,
        args.out,
        base=base,
        only_changed=args.only_changed,
        max_shard_bytes=args.max_shard_bytes,
        overwrite=args.overwrite,
        generation_config=generation_config,
    )
    print(args.out)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
