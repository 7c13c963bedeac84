"""``load_requests``: files or hub data sets in any known format → validated ``EditRequest``s.

``save_requests`` writes our own ("plain") form, which ``load_requests`` reads back exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from locft_jax.data.fields import FieldError
from locft_jax.data.formats import (
    FIELDS,
    FORMATS,
    Converter,
    FieldMap,
    check_field_map,
    detect_format,
    renamed,
)
from locft_jax.data.sources import RawEntry, Source, open_sources
from locft_jax.files import write_text_atomic
from locft_jax.requests import EditRequest, RequestError


@dataclasses.dataclass(frozen=True)
class LoadResult:
    """What ``load_requests`` read: the ``requests``, what it ``skipped`` and the ``format`` used.

    ``skipped`` holds ``(index, reason)``; ``index`` counts records across all files read, and
    ``reason`` names the file and its own record index.
    """

    requests: list[EditRequest]
    skipped: list[tuple[int, str]]
    format: str
    sources: list[str]


def load_requests(
    source: str | os.PathLike[str],
    format: str = "auto",
    field_map: FieldMap | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
    split: str = "train",
) -> LoadResult:
    """Read edit requests from a file, a glob (files concatenated in sorted order) or a hub name.

    ``format`` is ``"auto"`` (detected from each file's first record) or one of ``FORMATS``;
    ``field_map`` (our field name → column name) implies ``"plain"``. An invalid record or a
    repeated (prompt, target_new) pair raises ``RequestError`` naming the file and record,
    unless ``skip_invalid``, which drops it and reports it in ``skipped``. ``limit`` caps the
    number of requests returned. ``split`` is only used for hub data sets.
    """
    _check_arguments(format, field_map, limit)
    collector = _Collector(skip_invalid=skip_invalid, limit=limit)
    chosen: str | None = None
    labels: list[str] = []
    for src in open_sources(source, split):
        if collector.full():
            break
        name, entries = _resolve_format(src, format, field_map)
        if chosen is not None and name != chosen:
            raise RequestError(
                f"{src.label} is in format {name!r} but {labels[0]} is in {chosen!r}; "
                "load them separately or pass format="
            )
        chosen = name
        labels.append(src.label)
        convert = renamed(field_map) if name == "plain" and field_map else FORMATS[name]
        collector.read(src.label, entries, convert)
    return LoadResult(collector.requests, collector.skipped, format=chosen or format, sources=labels)


@dataclasses.dataclass
class _Collector:
    """Accumulates requests across sources: checks each, skips or raises, stops at ``limit``."""

    skip_invalid: bool
    limit: int | None
    requests: list[EditRequest] = dataclasses.field(default_factory=list)
    skipped: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    # (prompt, target_new) → (source label, record index) where it was first seen.
    first_seen: dict[tuple[str, str], tuple[str, int]] = dataclasses.field(default_factory=dict)
    counter: Iterator[int] = dataclasses.field(default_factory=itertools.count)

    def full(self) -> bool:
        return self.limit is not None and len(self.requests) >= self.limit

    def read(self, label: str, entries: Iterator[RawEntry], convert: Converter) -> None:
        """Add the requests of one source's ``entries``; a source with no entries is an error."""
        read = 0
        for entry in entries:
            if self.full():
                return
            read += 1
            index = next(self.counter)
            try:
                request = _to_request(entry, convert)
                self._check_unique(request, label, entry.index)
            except RequestError as e:
                if not self.skip_invalid:
                    raise RequestError(f"{label} {e}") from None
                self.skipped.append((index, f"{label} {e}"))
                continue
            self.requests.append(request)
        if read == 0:
            raise RequestError(f"{label}: no records")

    def _check_unique(self, request: EditRequest, label: str, index: int) -> None:
        """Raise if ``(prompt, target_new)`` was seen before; otherwise remember where."""
        key = (request.prompt, request.target_new)
        if key in self.first_seen:
            other_label, other_index = self.first_seen[key]
            other = f"record {other_index}" if other_label == label else f"{other_label} record {other_index}"
            raise RequestError(f"record {index}: duplicate of {other} (same prompt and target_new)")
        self.first_seen[key] = (label, index)


def _check_arguments(format: str, field_map: FieldMap | None, limit: int | None) -> None:
    if format != "auto" and format not in FORMATS:
        raise RequestError(f"unknown format {format!r}; valid formats: auto, {', '.join(FORMATS)}")
    if field_map is not None:
        if format not in ("auto", "plain"):
            raise RequestError(f"field_map applies to format 'plain' only, not {format!r}")
        check_field_map(field_map)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")


def _resolve_format(src: Source, format: str, field_map: FieldMap | None) -> tuple[str, Iterator[RawEntry]]:
    """The format to read ``src`` with, and its entries (the ones peeked at put back in front)."""
    if format != "auto":
        return format, src.entries
    if field_map is not None:
        return "plain", src.entries
    head: list[RawEntry] = []
    for entry in src.entries:
        head.append(entry)
        if isinstance(entry.record, Mapping):
            break
    if not head:
        raise RequestError(f"{src.label}: no records")
    first = head[-1]
    if not isinstance(first.record, Mapping):
        raise RequestError(f"{src.label}: no record is a JSON object, so the format cannot be detected")
    name = detect_format(first.record.keys())
    if name is None:
        raise RequestError(
            f"{src.label} record {first.index}: cannot tell the format from its keys "
            f"{sorted(first.record)}; pass format= (one of {', '.join(FORMATS)}) or a field_map"
        )
    return name, itertools.chain(head, src.entries)


def _to_request(entry: RawEntry, convert: Converter) -> EditRequest:
    """The validated request of one entry; ``RequestError("record i: ...")`` when unusable."""
    where = f"record {entry.index}"
    if entry.error is not None:
        raise RequestError(f"{where}: {entry.error}")
    if not isinstance(entry.record, Mapping):
        raise RequestError(f"{where}: expected an object, got {type(entry.record).__name__}")
    try:
        request = convert(entry.record)
    except FieldError as e:
        raise RequestError(f"{where}: {e}") from None
    request.validate(entry.index)
    return request


def load_texts(path: str | os.PathLike[str]) -> list[str]:
    """Plain-text passages, one per non-empty line (e.g. texts for ``edit(..., preserve=...)``)."""
    if Path(path).is_dir():
        raise RequestError(f"{path}: is a directory; expected a text file, one passage per line")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    texts = [line for line in text.splitlines() if line.strip()]
    if not texts:
        raise RequestError(f"{path}: no text (expected one passage per line)")
    return texts


def save_requests(requests: Iterable[EditRequest], path: str | os.PathLike[str]) -> None:
    """Write ``requests`` in the "plain" format: a JSON list, or JSON lines if ``path`` ends in .jsonl.

    Empty and ``None`` fields are left out; ``load_requests(path)`` gives back equal requests.
    """
    path = Path(path)
    records = [request_to_record(r) for r in requests]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = json.dumps(records, ensure_ascii=False, indent=1) + "\n"
    write_text_atomic(path, text)


def request_to_record(request: EditRequest) -> dict[str, Any]:
    """One request as a JSON-ready dict in our field names (tuples as lists, empties left out)."""
    record: dict[str, Any] = {}
    for name in FIELDS:
        value = getattr(request, name)
        if value is None or value == ():
            continue
        record[name] = list(value) if isinstance(value, tuple) else value
    return record
