"""A GGUF file's tokenizer, converted once and kept on disk.

transformers builds a tokenizer from a GGUF vocabulary in Python: about 4 s for SmolLM2's 49,152
tokens, on every load. The converted tokenizer, saved with ``save_pretrained``, loads in about
0.15 s. It is kept under ``$LOCFT_CACHE_DIR/tokenizers/KEY`` (default ``$XDG_CACHE_HOME/locft-jax``,
else ``~/.cache/locft-jax``, beside the XLA compile cache; ``LOCFT_CACHE_DIR=''`` turns it off).
KEY hashes the file's resolved path, size and modification time and the transformers version, so a
changed file or a new converter is converted again. The directory appears complete or not at all
(written beside it, then renamed), and a cache that cannot be written is skipped: the converted
tokenizer is returned either way. An entry that no longer loads (damaged or edited after it was
written) is converted again and replaced, with a warning naming it.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

from convert.atomic import atomic_output_dir
from convert.errors import CheckpointError

CACHE_ENV = "LOCFT_CACHE_DIR"


def cache_root() -> Path | None:
    """Where locft-jax keeps converted files; ``None`` when ``LOCFT_CACHE_DIR`` is set empty."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return Path(value) if value else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "locft-jax"


def gguf_tokenizer(path: str | Path) -> Any:
    """transformers' tokenizer for the GGUF file ``path``, from the cache when it holds one."""
    import transformers

    path = Path(path).resolve()
    stat = path.stat()
    root = cache_root()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    cached = root / "tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:20] if root else None
    damaged = False
    if cached is not None and cached.exists():
        try:
            if not (cached / "tokenizer.json").is_file():
                raise FileNotFoundError("it has no tokenizer.json")
            return transformers.AutoTokenizer.from_pretrained(str(cached))
        except Exception as err:  # noqa: BLE001 - any failure to read it means: convert again
            damaged = True
            warnings.warn(f"tokenizer cache entry {cached} does not load ({type(err).__name__}: {err}); "
                          "converting the GGUF tokenizer again and replacing the entry", stacklevel=2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if cached is not None:
        _save(tokenizer, cached, replace=damaged)
    return tokenizer


def _save(tokenizer: Any, cached: Path, replace: bool) -> None:
    try:
        with atomic_output_dir(cached, overwrite=replace) as tmp:
            tokenizer.save_pretrained(str(tmp))
    except (OSError, CheckpointError):
        pass  # read-only or full disk, or another process saved it first: same tokenizer either way
