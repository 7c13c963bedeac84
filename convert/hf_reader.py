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
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a model config (a JSON object expected)")
    generation_path = Path(model_dir) / "generation_config.json"
    try:
        generation = json.loads(generation_path.read_text()) if generation_path.is_file() else None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{generation_path}: invalid JSON ({err})") from None
    quantization = raw.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        raise CheckpointError(
            f"{path}: a quantized checkpoint (quantization_config.quant_method {method!r}); locft-jax reads "
            "float32/float16/bfloat16 safetensors (or a GGUF file): use the unquantized model"
        )
    try:
        return ModelConfig.from_hf_config(raw, generation)
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None


class HFTensors:
    """The weights of an HF directory: one or sharded safetensors files (with index).

    Like transformers, ``model.safetensors`` wins over an index next to it (``save_pretrained``
    unsharded into a directory once saved sharded deletes the shards but leaves the index)."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / INDEX_NAME
        if (self.dir / SINGLE_NAME).exists():
            single = SafetensorsFile(self.dir / SINGLE_NAME)
            self._where = {name: single for name in single.names()}
        elif index.exists():
            self._where = _read_index(index)
        elif list(self.dir.glob("*.bin")):
            raise CheckpointError(
                f"{self.dir}: only pickle .bin weights found; locft-jax reads safetensors only "
                "(pickle can run code). Re-save the model with save_pretrained(safe_serialization=True)."
            )
        else:
            found = sorted(p.name for p in self.dir.glob("*.safetensors"))
            raise CheckpointError(
                f"{self.dir}: no {SINGLE_NAME} or {INDEX_NAME} found"
                + (f" (shards {found[:3]} without their index?)" if found else "")
            )

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


def _read_index(index: Path) -> dict[str, SafetensorsFile]:
    """Tensor name → its opened shard, per the index; every shard listed must hold its tensors."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index}: not a valid safetensors index ({err!r})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{index}: not a valid safetensors index (weight_map is not {{tensor: file}})")
    files = {}
    for name in sorted(set(weight_map.values())):
        try:
            files[name] = SafetensorsFile(index.parent / name)
        except CheckpointError as err:
            raise CheckpointError(f"{err} (listed in {index})") from None
    held = {name: set(f.names()) for name, f in files.items()}
    for tensor, file in weight_map.items():
        if tensor not in held[file]:
            raise CheckpointError(f"{index}: maps tensor {tensor!r} to {file}, which does not contain it")
    return {tensor: files[file] for tensor, file in weight_map.items()}
