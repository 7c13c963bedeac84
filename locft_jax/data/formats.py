"""One converter per benchmark format: a raw record (a dict) → ``EditRequest``.

Formats (``FORMATS``), each recognised by ``detect_format`` from the first record's keys:

- ``zsre``: ZsRE as MEND ships it (``src, alt, answers, rephrase, loc, loc_ans, subject``).
- ``counterfact``: CounterFact as ROME ships it (``requested_rewrite{prompt, subject, target_new,
  target_true}, paraphrase_prompts, neighborhood_prompts``).
- ``easyedit``: EasyEdit's processed CounterFact/ZsRE (``prompt, target_new, ground_truth,
  rephrase_prompt, locality_prompt, locality_ground_truth``).
- ``wikibigedit``: WikiBigEdit (``subject, relation, update, ans, rephrase, personas, loc, loc_ans,
  mhop, mhop_ans``).
- ``knowedit``: KnowEdit (``prompt, target_new, ground_truth, rephrase_prompt``, and ``locality`` /
  ``portability`` as ``{name: [{prompt, ground_truth}, ...]}``); its WikiBio set names the first
  three ``text, labels, concept``.
- ``plain``: our own field names (what ``save_requests`` writes), or any JSON/JSONL/CSV whose
  columns ``field_map`` renames to ours.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from locft_jax.data.fields import (
    FieldError,
    absent,
    first_text,
    lookup,
    optional_text,
    required_text,
    texts,
    texts_of,
)
from locft_jax.requests import EditRequest, RequestError

Record = Mapping[str, Any]
FieldMap = Mapping[str, "str | list[str]"]
Converter = Callable[[Record], EditRequest]

FIELDS = tuple(f.name for f in dataclasses.fields(EditRequest))
MULTI_FIELDS = tuple(f for f in FIELDS if f.endswith(("_prompts", "_answers")))
REQUIRED_FIELDS = ("prompt", "target_new")
# EasyEdit's *_portability_gpt4.json files add one multi-hop question to ZsRE / CounterFact records.
_NEW_QUESTION, _NEW_ANSWER = "portability.New Question", "portability.New Answer"

# Formats that only rename fields, as field maps (ours → theirs; unnamed fields keep our name).
# ZsRE's ``loc`` keeps its "nq question: " prefix, as EasyEdit does; ``answers[0]`` is the truth.
ZSRE: FieldMap = {
    "prompt": "src",
    "target_new": "alt",
    "ground_truth": "answers",
    "rephrase_prompts": "rephrase",
    "locality_prompts": "loc",
    "locality_answers": "loc_ans",
    "portability_prompts": _NEW_QUESTION,
    "portability_answers": _NEW_ANSWER,
}
EASYEDIT: FieldMap = {
    "rephrase_prompts": "rephrase_prompt",
    "locality_prompts": "locality_prompt",
    "locality_answers": "locality_ground_truth",
    "portability_prompts": ["portability_prompt", _NEW_QUESTION],
    "portability_answers": ["portability_ground_truth", _NEW_ANSWER],
}
# WikiBigEdit: ``update`` is the prompt, ``ans`` the new answer, ``mhop`` a multi-hop probe.
# ``personas`` asks the question again in a persona's voice; like ``rephrase``, ``ans`` answers it.
WIKIBIGEDIT: FieldMap = {
    "prompt": "update",
    "target_new": "ans",
    "rephrase_prompts": ["rephrase", "personas"],
    "locality_prompts": "loc",
    "locality_answers": "loc_ans",
    "portability_prompts": "mhop",
    "portability_answers": "mhop_ans",
}


def counterfact(record: Record) -> EditRequest:
    """CounterFact (ROME format). Neighborhood prompts must still give ``target_true`` (EasyEdit)."""
    template = required_text(record, "requested_rewrite.prompt")
    if "{}" not in template:
        raise FieldError(f"field 'requested_rewrite.prompt' has no '{{}}' for the subject: {template!r}")
    subject = required_text(record, "requested_rewrite.subject")
    neighborhood = texts(record, "neighborhood_prompts")
    if neighborhood:
        ground_truth: str | None = required_text(record, "requested_rewrite.target_true.str")
    else:
        ground_truth = optional_text(record, "requested_rewrite.target_true.str")
    return EditRequest(
        prompt=template.replace("{}", subject),
        target_new=required_text(record, "requested_rewrite.target_new.str"),
        subject=subject,
        ground_truth=ground_truth,
        rephrase_prompts=texts(record, "paraphrase_prompts"),
        locality_prompts=neighborhood,
        locality_answers=(ground_truth,) * len(neighborhood) if ground_truth else (),
        relation=optional_text(record, "requested_rewrite.relation_id"),
    )


def knowedit(record: Record) -> EditRequest:
    """KnowEdit: locality and portability are named groups of ``{prompt, ground_truth}`` probes.

    Its WikiBio set has ``text`` (the passage to continue), ``labels`` (the new continuation) and
    ``concept`` (the subject) for ``prompt``, ``target_new`` and ``subject``, as EasyEdit reads it.
    """
    locality_prompts, locality_answers = _named_probes(record, "locality")
    portability_prompts, portability_answers = _named_probes(record, "portability")
    rephrase_key = "rephrase_prompt" if "rephrase_prompt" in record else "rephrase"
    wikibio = "prompt" not in record and "text" in record
    return EditRequest(
        prompt=required_text(record, "text" if wikibio else "prompt"),
        target_new=required_text(record, "labels" if wikibio else "target_new"),
        subject=optional_text(record, "concept" if wikibio else "subject"),
        ground_truth=first_text(lookup(record, "ground_truth"), "ground_truth"),
        rephrase_prompts=texts(record, rephrase_key),
        locality_prompts=locality_prompts,
        locality_answers=locality_answers,
        portability_prompts=portability_prompts,
        portability_answers=portability_answers,
    )


def _named_probes(record: Record, key: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """All ``(prompt, answer)`` pairs of ``record[key]``, group after group, in file order."""
    groups = lookup(record, key)
    if absent(groups) or groups in ({}, []):
        return (), ()
    if not isinstance(groups, Mapping):
        kind = type(groups).__name__
        raise FieldError(f"field {key!r}: expected an object of named probe lists, got {kind}")
    pairs: list[tuple[str, str]] = []
    for name, probes in groups.items():
        pairs.extend(_group_pairs(probes, f"{key}.{name}"))
    return tuple(p for p, _ in pairs), tuple(a for _, a in pairs)


def _group_pairs(probes: Any, where: str) -> list[tuple[str, str]]:
    """One group: a list of ``{prompt, ground_truth}``, or one such object with parallel lists."""
    if isinstance(probes, Mapping):
        return _parallel_pairs(probes, where)
    if not isinstance(probes, list):
        raise FieldError(f"field {where!r}: expected a list of probes, got {type(probes).__name__}")
    pairs = []
    for i, probe in enumerate(probes):
        at = f"{where}[{i}]"
        if not isinstance(probe, Mapping):
            raise FieldError(f"field {at!r}: expected an object with prompt and ground_truth")
        answer = _answer(probe.get("ground_truth"), f"{at}.ground_truth")
        prompts = texts_of(probe.get("prompt"), f"{at}.prompt")
        if not prompts:
            raise FieldError(f"missing field '{at}.prompt'")
        pairs.extend((p, answer) for p in prompts)
    return pairs


def _parallel_pairs(probes: Mapping[str, Any], where: str) -> list[tuple[str, str]]:
    """EasyEdit's in-memory form ``{prompt: [...], ground_truth: [...]}``, paired index by index."""
    if isinstance(probes.get("prompt"), str):
        return _group_pairs([probes], where)
    prompts = texts_of(probes.get("prompt"), f"{where}.prompt")
    raw = probes.get("ground_truth")
    raw = raw if isinstance(raw, list) else [raw]
    answers = [_answer(a, f"{where}.ground_truth[{i}]") for i, a in enumerate(raw)]
    if len(prompts) != len(answers):
        raise FieldError(f"field {where!r}: {len(prompts)} prompts but {len(answers)} answers")
    return list(zip(prompts, answers, strict=True))


def _answer(value: Any, where: str) -> str:
    answer = first_text(value, where)
    if answer is None:
        raise FieldError(f"missing field {where!r}")
    return answer


def plain(record: Record, field_map: FieldMap | None = None) -> EditRequest:
    """Our field names, each renamed by ``field_map`` (ours → theirs) where given.

    ``ground_truth`` may be a list (answers, aliases): its first string is taken.

    Dotted names reach nested keys (``"meta.question"``). A multi-valued field may map to a list
    of columns (``{"rephrase_prompts": ["para1", "para2"]}``); each holds a string or a list.
    """
    columns = dict(field_map or {})
    values: dict[str, Any] = {}
    for name in FIELDS:
        sources = columns.get(name, name)
        sources = [sources] if isinstance(sources, str) else list(sources)
        if name in MULTI_FIELDS:
            values[name] = tuple(t for src in sources for t in texts(record, src))
        elif name in REQUIRED_FIELDS:
            values[name] = required_text(record, sources[0])
        elif name == "ground_truth":  # may be a list of answers or aliases: the first is canonical
            values[name] = first_text(lookup(record, sources[0]), sources[0])
        else:
            values[name] = optional_text(record, sources[0])
    return EditRequest(**values)


def renamed(field_map: FieldMap) -> Converter:
    """The converter of a format that only renames fields: ``plain`` with a fixed ``field_map``."""
    return functools.partial(plain, field_map=field_map)


def check_field_map(field_map: FieldMap) -> None:
    """Raise ``RequestError`` unless ``field_map`` maps our field names to column names."""
    for ours, theirs in field_map.items():
        if ours not in FIELDS:
            raise RequestError(f"field_map: unknown field {ours!r}; valid fields: {', '.join(FIELDS)}")
        several = isinstance(theirs, list) and all(isinstance(t, str) for t in theirs)
        if not isinstance(theirs, str) and not (several and ours in MULTI_FIELDS):
            raise RequestError(
                f"field_map[{ours!r}]: expected a column name"
                + (" or a list of column names" if ours in MULTI_FIELDS else "")
                + f", got {theirs!r}"
            )


FORMATS: dict[str, Converter] = {
    "zsre": renamed(ZSRE),
    "counterfact": counterfact,
    "easyedit": renamed(EASYEDIT),
    "wikibigedit": renamed(WIKIBIGEDIT),
    "knowedit": knowedit,
    "plain": plain,
}

_OUR_ONLY_KEYS = frozenset(MULTI_FIELDS)


def detect_format(keys: Iterable[str]) -> str | None:
    """The format whose signature keys ``keys`` has, or ``None``. Order matters: most specific first."""
    keys = frozenset(keys)
    if "requested_rewrite" in keys:
        return "counterfact"
    if {"src", "alt"} <= keys:
        return "zsre"
    if {"update", "ans"} <= keys:
        return "wikibigedit"
    if not set(REQUIRED_FIELDS) <= keys:
        return "knowedit" if {"text", "labels", "concept"} <= keys else None  # KnowEdit's WikiBio
    if keys & _OUR_ONLY_KEYS:
        return "plain"
    if keys & {"locality_prompt", "locality_ground_truth"}:
        return "easyedit"
    if keys & {"locality", "portability"}:
        return "knowedit"
    return "plain" if keys <= set(FIELDS) else "easyedit"
