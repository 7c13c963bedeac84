"""Read a Hugging Face model directory: config, tokenizer and weights, tensor by tensor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from convert.errors import CheckpointError
from convert.safetensors_io import SafetensorsFile
from locft_jax.config import ConfigError, ModelConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def read_hf_config(model_dir: str | Path) -> ModelConfig:
    """The directory's ``config.json``, with the EOS ids of its ``generation_config.json`` if it has one
    (which transformers' ``generate`` stops at instead of ``config.json``'s)."""
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found (not a Hugging Face model directory?)") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON ({err})") from None
    generation_path = Path(model_dir) / "generation_config.json"
    try:
        generation = json.loads(generation_path.read_text()) if generation_path.is_file() else None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{generation_path}: invalid JSON ({err})") from None
    try:
        return ModelConfig.from_hf_config(raw, generation)
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None


class HFTensors:
    """The weights of an HF directory: one or sharded safetensors files (with index)."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / INDEX_NAME
        if index.exists():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
            files = {name: SafetensorsFile(self.dir / name) for name in sorted(set(weight_map.values()))}
            self._where = {tensor: files[file] for tensor, file in weight_map.items()}
        elif (self.dir / SINGLE_NAME).exists():
            single = SafetensorsFile(self.dir / SINGLE_NAME)
            self._where = {name: single for name in single.names()}
        elif list(self.dir.glob("*.bin")):
            raise CheckpointError(
                f"{self.dir}: only pickle .bin weights found; locft-jax reads safetensors only "
                "(pickle can run code). Re-save the model with save_pretrained(safe_serialization=True)."
            )
        else:
            raise CheckpointError(f"{self.dir}: no {SINGLE_NAME} or {INDEX_NAME} found")

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._file(name).dtype(name)

    def read(self, name: str) -> np.ndarray:
        return self._file(name).read(name)

    def file_of(self, name: str) -> Path:
        return self._file(name).path

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._where:
            raise CheckpointError(f"{self.dir}: checkpoint has no tensor {name!r}")
        return self._where[name]
