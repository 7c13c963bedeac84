"""Open any supported checkpoint (HF directory, GGUF file, ``convert.from_hf`` directory)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from convert.errors import CheckpointError
from locft_jax.config import ModelConfig


class TensorSource(Protocol):
    """Weights readable one at a time, under HF names and HF layouts."""

    def names(self) -> list[str]: ...

    def read(self, name: str) -> np.ndarray: ...


@dataclass
class Checkpoint:
    config: ModelConfig
    tensors: TensorSource
    tokenizer_path: Path
    tokenizer_kwargs: dict[str, Any]

    def load_tokenizer(self) -> Any:
        if "gguf_file" in self.tokenizer_kwargs:  # converted by transformers once, then from a cache
            from convert.tokenizer_cache import gguf_tokenizer

            return gguf_tokenizer(self.tokenizer_path / self.tokenizer_kwargs["gguf_file"])
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.tokenizer_path), **self.tokenizer_kwargs)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """An HF model directory (safetensors, single or sharded), a ``.gguf`` file, or a directory
    written by ``convert.from_hf`` (orbax params; recognised by its ``locft.json`` marker)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file() and path.suffix == ".gguf":
        from convert.gguf_reader import open_gguf

        return open_gguf(path)
    if path.is_dir():
        from convert.orbax_io import is_locft_checkpoint, open_locft_checkpoint

        if is_locft_checkpoint(path):
            return open_locft_checkpoint(path)
        from convert.hf_reader import HFTensors, read_hf_config

        return Checkpoint(read_hf_config(path), HFTensors(path), path, {})
    raise CheckpointError(f"{path}: expected a Hugging Face model directory or a .gguf file")
