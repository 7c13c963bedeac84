"""Open any supported checkpoint (HF directory, GGUF file, ``convert.from_hf`` directory)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from convert.errors import CheckpointError
from locft_jax.config import ModelConfig

# The files a transformers tokenizer is built from (fast, sentencepiece, BPE vocab, Mistral tekken).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tekken.json")


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

        try:
            return AutoTokenizer.from_pretrained(str(self.tokenizer_path), **self.tokenizer_kwargs)
        except (OSError, ValueError) as err:  # no tokenizer files, or ones this install cannot read
            if not any((self.tokenizer_path / name).is_file() for name in _TOKENIZER_FILES):
                message = f"none of {', '.join(_TOKENIZER_FILES)} found; copy the model's tokenizer files here"
            else:
                message = " ".join(str(err).split())
            raise CheckpointError(f"{self.tokenizer_path}: cannot load its tokenizer ({message})") from None


def open_checkpoint(path: str | Path) -> Checkpoint:
    """An HF model directory (safetensors, single or sharded), a ``.gguf`` file, or a directory
    written by ``convert.from_hf`` (orbax params; recognised by its ``locft.json`` marker); a hub
    name (``org/model``) that is no local path is looked up in the local Hugging Face cache."""
    path = resolve_source(path)
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


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_source(path: str | Path) -> Path:
    """``path`` if it exists (``~`` expanded); else, for a hub name ``org/model``, its snapshot in the
    local Hugging Face cache (``hf download org/model`` puts it there). Never downloads."""
    local = Path(path).expanduser()
    if local.exists():
        return local
    name = str(path)
    if not _REPO_ID.fullmatch(name):
        raise CheckpointError(f"{local}: no such file or directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except (OSError, ValueError):  # not in the cache (LocalEntryNotFoundError), or not a valid repo id
        raise CheckpointError(
            f"{name}: no such file or directory, and not in the local Hugging Face cache; locft-jax never "
            f"downloads: download it first (`hf download {name} --local-dir DIR`) and pass DIR"
        ) from None
