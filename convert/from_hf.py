"""Convert an HF model directory or a GGUF file into our checkpoint directory (orbax params).

    python -m convert.from_hf SRC OUT [--dtype float32|bfloat16] [--overwrite]

OUT (see ``convert.orbax_io``) holds the params in orbax format, ``config.json`` and the
tokenizer; ``load_model(OUT)`` / ``open_checkpoint(OUT)`` read it back.

Peak host memory: one copy of the params in the target dtype (they are built tensor by tensor
from the memory-mapped source, on one device; on an accelerator that copy is in device memory),
plus one source tensor being read or dequantized, plus orbax's write buffers, bounded to ~1 GB.
The source file itself is memory-mapped (page cache), never loaded whole.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convert.atomic import atomic_output_dir, check_output_dir
from convert.cli import DTYPES, read_params, run_cli
from convert.orbax_io import save_params
from convert.sources import open_checkpoint, resolve_source
from convert.to_hf import GENERATION_CONFIG, write_config_json
from locft_jax.config import ModelConfig
from locft_jax.params import Params


def save_checkpoint(
    params: Params,
    config: ModelConfig,
    tokenizer: Any,
    out: str | Path,
    overwrite: bool = False,
    source: str = "",
    generation_config: str | Path | None = None,
) -> Path:
    """Write ``params`` (e.g. edited ones) as a ``convert.from_hf``-style directory, atomically."""
    dtype = np.dtype(params["model"]["embed_tokens"]["weight"].dtype)
    with atomic_output_dir(out, overwrite) as tmp:
        save_params(params, tmp, dtype.name, source=source)
        write_config_json(tmp, config, dtype)
        tokenizer.save_pretrained(str(tmp))
        if generation_config is not None:
            shutil.copyfile(generation_config, tmp / GENERATION_CONFIG)
    return Path(out)


def convert_to_orbax(src: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write ``src`` (HF dir or ``.gguf``) as a ``convert.from_hf`` directory ``out``, atomically."""
    check_output_dir(Path(out), overwrite)  # fail before the slow part
    src = resolve_source(src)
    ckpt = open_checkpoint(src)
    tokenizer = ckpt.load_tokenizer()  # before the weights, too
    params = read_params(ckpt, DTYPES[dtype], where=str(src))
    generation_config = src / GENERATION_CONFIG if src.is_dir() else None
    return save_checkpoint(
        params,
        ckpt.config,
        tokenizer,
        out,
        overwrite=overwrite,
        source=str(src),
        generation_config=generation_config if generation_config and generation_config.is_file() else None,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m convert.from_hf", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="an HF model directory (safetensors), a .gguf file, or a cached hub name")
    parser.add_argument("out", type=Path, help="the checkpoint directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="params dtype (default float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    convert_to_orbax(args.src, args.out, args.dtype, overwrite=args.overwrite)
    print(args.out)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
