"""Atomic writes: the file is the old one or the whole new one, and no temp file is left behind."""

from __future__ import annotations

import os

import pytest

from locft_jax import files
from locft_jax.files import write_text_atomic


def test_write_text_atomic_replaces_the_file_whole(tmp_path):
    path = tmp_path / "report.json"
    write_text_atomic(path, "old")
    write_text_atomic(path, "néw\n")
    assert path.read_text(encoding="utf-8") == "néw\n"
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    write_text_atomic(path, "old")

    def killed(src, dst):
        raise KeyboardInterrupt  # as if the run were stopped between writing and renaming

    monkeypatch.setattr(files.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(path, "new")
    monkeypatch.setattr(files.os, "replace", os.replace)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
