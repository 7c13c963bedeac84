"""Minimal safetensors reading (memory-mapped, tensor by tensor) and streaming writing.

Reading parses the header ourselves so that a truncated or corrupt file is reported with the
file and tensor name, bfloat16 needs no torch, and a tensor is read only when asked for.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from convert.errors import CheckpointError

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class SafetensorsFile:
    """One ``.safetensors`` file: ``names()``, ``shape(name)``, ``read(name) -> np.ndarray``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{self.path}: not a safetensors file (shorter than its 8-byte header)")
                (header_len,) = struct.unpack("<Q", raw)
                if header_len > size - 8:
                    raise CheckpointError(f"{self.path}: truncated or corrupt (header length {header_len} > file size)")
                header = json.loads(f.read(header_len))
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({err})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._entries = header
        self._data_start = 8 + header_len
        for name, entry in header.items():
            if not isinstance(entry, dict):
                raise CheckpointError(f"{self.path}: corrupt safetensors header entry for tensor {name!r}: {entry!r}")
            if entry.get("dtype") not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
            shape, offsets = entry.get("shape"), entry.get("data_offsets")
            if not (
                isinstance(shape, list)
                and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(offsets, list)
                and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]
            ):
                raise CheckpointError(f"{self.path}: corrupt safetensors header entry for tensor {name!r}: {entry!r}")
            begin, end = offsets
            nbytes = DTYPES[entry["dtype"]].itemsize * math.prod(shape)
            if end - begin != nbytes:
                raise CheckpointError(
                    f"{self.path}: corrupt safetensors header: tensor {name!r} ({entry['dtype']}{shape}) needs "
                    f"{nbytes} bytes, its data_offsets {offsets} span {end - begin}"
                )
            if self._data_start + end > size:
                raise CheckpointError(
                    f"{self.path}: truncated: tensor {name!r} needs bytes up to {self._data_start + end}, "
                    f"file has {size}"
                )
        self._mmap: np.memmap | None = None

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def read(self, name: str) -> np.ndarray:
        """The tensor as a read-only, memory-mapped numpy array (no copy)."""
        if name not in self._entries:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        raw = self._mmap[self._data_start + begin : self._data_start + end]
        return raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (in the given order) to ``path``; the caller handles atomicity."""
    arrays = {name: np.asarray(value) for name, value in tensors.items()}
    layout = {name: (arr.dtype, arr.shape) for name, arr in arrays.items()}
    write_safetensors_streaming(path, layout, arrays.__getitem__, metadata)


def write_safetensors_streaming(
    path: str | Path,
    layout: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
    read: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write tensors ``{name: (dtype, shape)}`` in order, calling ``read(name)`` for each just before
    it is written, so only one tensor is in memory; the caller handles atomicity."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in layout.items():
        dtype = np.dtype(dtype)
        if dtype not in DTYPE_NAMES:
            raise CheckpointError(f"tensor {name!r}: dtype {dtype} cannot be written to safetensors")
        nbytes = dtype.itemsize * math.prod(shape)
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the spec aligns the data start to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, (dtype, shape) in layout.items():
            arr = np.ascontiguousarray(read(name))
            if arr.dtype != np.dtype(dtype) or arr.shape != tuple(shape):
                raise CheckpointError(
                    f"{path}: tensor {name!r} is {arr.dtype}{list(arr.shape)}, expected {np.dtype(dtype)}{list(shape)}"
                )
            f.write(arr.tobytes() if arr.ndim == 0 else memoryview(arr.reshape(-1).view(np.uint8)))
