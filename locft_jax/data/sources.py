"""Where records come from: a JSON/JSONL/CSV file, a glob of them, or a ``datasets`` hub name.

Each source yields ``RawEntry``s: the record (or why it could not be read) and its index in that
source, so every later error can say "file record i".
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from locft_jax.requests import RequestError

_GLOB_CHARS = re.compile(r"[*?\[]")
# "owner/name" or "name", as the hub spells datasets; anything else is taken for a local path.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
FILE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".tsv")


@dataclasses.dataclass(frozen=True)
class RawEntry:
    """One record as read (``record``), or the reason it could not be read (``error``)."""

    index: int
    record: Any = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Source:
    """A named stream of raw records: ``label`` is what error messages call it."""

    label: str
    entries: Iterator[RawEntry]


def open_sources(source: str | os.PathLike[str], split: str = "train") -> list[Source]:
    """The sources ``source`` names: a file, the files a glob matches (sorted), or a hub data set."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file():
        return [file_source(path)]
    if path.is_dir():
        raise RequestError(f"{text}: is a directory; pass a file or a glob such as '{text}/*.json'")
    if _GLOB_CHARS.search(text):
        matches = sorted(p for p in glob.glob(os.path.expanduser(text), recursive=True) if Path(p).is_file())
        if not matches:
            raise FileNotFoundError(f"no files match {text!r}")
        return [file_source(Path(m)) for m in matches]
    if _HUB_NAME.fullmatch(text) and not text.endswith(FILE_SUFFIXES):
        return [hub_source(text, split)]
    raise FileNotFoundError(f"no such file: {text!r}")


def file_source(path: Path) -> Source:
    """The records of one file; the suffix picks the reader (unknown suffix: sniff JSON vs JSONL)."""
    label = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise RequestError(f"{label}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise RequestError(f"{label}: the file is empty")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return Source(label, _csv_entries(text, label, "\t" if suffix == ".tsv" else ","))
    if suffix in (".jsonl", ".ndjson") or (suffix != ".json" and text.lstrip().startswith("{")):
        return Source(label, _jsonl_entries(text))
    return Source(label, _json_entries(text, label))


def _json_entries(text: str, label: str) -> Iterator[RawEntry]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _jsonl_entries(text)  # JSON lines under a .json name, as some data sets ship
        raise RequestError(f"{label}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(data, list):
        raise RequestError(f"{label}: expected a JSON list of records, got {type(data).__name__}")
    return (RawEntry(i, record) for i, record in enumerate(data))


def _jsonl_entries(text: str) -> Iterator[RawEntry]:
    """One record per non-blank line; a bad line becomes an entry with an ``error``."""
    index = 0
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield RawEntry(index, json.loads(line))
        except json.JSONDecodeError as e:
            yield RawEntry(index, error=f"line {line_number} is not valid JSON: {e.msg} (column {e.colno})")
        index += 1


def _csv_entries(text: str, label: str, delimiter: str) -> Iterator[RawEntry]:
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    if not reader.fieldnames:
        raise RequestError(f"{label}: no header row")
    for index, row in enumerate(reader):
        if None in row:  # DictReader files surplus cells under the key None.
            yield RawEntry(index, error=f"line {reader.line_num} has more cells than the header")
        else:
            yield RawEntry(index, row)


def hub_source(name: str, split: str) -> Source:
    """A data set from the Hugging Face hub (or its local cache), read with ``datasets``."""
    import datasets  # Imported here: only hub names need it, and it is slow to import.

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types; all mean "could not get it".
        raise RequestError(f"{name!r} is not a local file and could not be loaded from the hub: {e}") from e
    return Source(name, (RawEntry(i, dict(record)) for i, record in enumerate(dataset)))
