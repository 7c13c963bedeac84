"""All-or-nothing output directories: one appears complete, or not at all.

Everything is written into a temporary sibling (same file system, so the final rename is atomic)
and renamed into place only when the writer finished without an exception.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from convert.errors import CheckpointError


def check_output_dir(out: Path, overwrite: bool = False) -> None:
    """Raise unless ``out`` may be written: absent, an empty dir, or ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out}: exists and is not empty (pass overwrite=True / --overwrite to replace it)")


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside ``out``; on success it becomes ``out``, on any exception it is removed.

    An existing non-empty ``out`` is refused unless ``overwrite``; then the old one is renamed
    aside, the new one renamed in, and only then the old one deleted, so ``out`` is never half
    written (at worst, after a crash between the two renames, the old copy survives beside it).
    """
    # A symlinked OUT (say, to a scratch disk) is written through: its target is what gets replaced
    # (renaming a directory onto the link itself fails, after all the work).
    out = Path(out).resolve()
    check_output_dir(out, overwrite)  # fail before any work is done
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model dir should be as readable as any other
    try:
        yield tmp
        check_output_dir(out, overwrite)  # someone may have written it meanwhile
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old)  # old is an empty dir: replace() swaps a dir onto an empty one
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
