"""locft_jax.data: every benchmark format → EditRequest, precise errors, and the country edit sets."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from locft_jax.data import FORMATS, EditRequest, RequestError, detect_format, load_requests, save_requests

DATA = Path(__file__).parent / "data"
BAD = DATA / "malformed"
EXPERIMENT_DATA = Path(__file__).parents[1] / "experiments" / "data"


# --- each format's sample parses to the expected requests ---------------------------------------


def test_zsre_mend():
    result = load_requests(DATA / "zsre_mend.json")
    assert result.format == "zsre" and result.skipped == []
    first, second, third = result.requests
    assert first == EditRequest(
        prompt="Which country was Ada Lovelace a citizen of?",
        target_new="Portugal",
        subject="Ada Lovelace",
        ground_truth="United Kingdom",
        rephrase_prompts=("Ada Lovelace held the citizenship of which country?",),
        locality_prompts=("nq question: who wrote the novel moby dick",),
        locality_answers=("Herman Melville",),
    )
    assert (second.prompt, second.target_new) == ("Into which sea does the Danube flow?", "Baltic Sea")
    assert third.ground_truth == "NASA"  # the first of several answers
    assert third.portability_answers == ("Paris",) and len(third.portability_prompts) == 1


def test_counterfact_rome():
    result = load_requests(DATA / "counterfact_rome.json")
    assert result.format == "counterfact"
    first, second, third = result.requests
    assert first.prompt == "The mother tongue of Jean Moulin is"
    assert (first.subject, first.target_new, first.ground_truth) == ("Jean Moulin", "Dutch", "French")
    assert first.relation == "P103"
    assert first.rephrase_prompts[1] == "Jean Moulin's native language is"
    assert first.locality_prompts[0] == "The mother tongue of Albert Camus is"
    assert first.locality_answers == ("French",) * 3  # neighbours keep the true object (EasyEdit)
    assert second.prompt == "Mount Kilimanjaro is located in the continent of"
    assert second.locality_answers == ("Africa", "Africa")
    assert third.prompt == "Nokia, whose headquarters are in"


def test_counterfact_easyedit():
    result = load_requests(DATA / "counterfact_easyedit.json")
    assert result.format == "easyedit"
    assert result.requests[0] == EditRequest(
        prompt="The mother tongue of Jean Moulin is",
        target_new="Dutch",
        subject="Jean Moulin",
        ground_truth="French",
        rephrase_prompts=("Jean Moulin's native language is",),
        locality_prompts=("The mother tongue of Albert Camus is",),
        locality_answers=("French",),
    )


def test_easyedit_portability_question(tmp_path):
    record = json.loads((DATA / "counterfact_easyedit.json").read_text())[2]
    record["portability"] = {"New Question": "Which country is Nokia's head office in?", "New Answer": "USA"}
    (tmp_path / "cf_portability.json").write_text(json.dumps([record]))
    result = load_requests(tmp_path / "cf_portability.json")
    assert result.format == "easyedit"
    assert result.requests[0].locality_answers == ("Espoo",)
    assert result.requests[0].portability_answers == ("USA",)


def test_wikibigedit():
    result = load_requests(DATA / "wikibigedit.json")
    assert result.format == "wikibigedit"
    first, _, third = result.requests
    assert (first.prompt, first.target_new, first.subject) == (
        "Which country contains Lake Baikal?",
        "Mongolia",
        "Lake Baikal",
    )
    assert first.rephrase_prompts == ("Lake Baikal lies in which country?",)
    assert first.locality_answers == ("Vincent van Gogh",)
    assert first.portability_prompts == ("What is the capital of the country that contains Lake Baikal?",)
    assert first.portability_answers == ("Ulaanbaatar",)
    assert third.portability_prompts == () and third.portability_answers == ()  # mhop: null


def test_wikibigedit_release_keeps_the_persona_question():
    # The released files (lukasthede/WikiBigEdit) add ``personas``: the question asked again in a
    # persona's voice, answered by ``ans`` (EasyEdit scores it against target_new).
    result = load_requests(DATA / "wikibigedit_release.json")
    assert result.format == "wikibigedit"
    mayor, goerlitz = result.requests
    assert mayor.rephrase_prompts == (
        "What role has Lindenau held, either now or in the past?",
        "Arrr! What be the post that Lindenau be holdin', matey?",
    )
    assert (mayor.relation, mayor.portability_prompts) == ("position held", ())
    assert goerlitz.rephrase_prompts[1] == "What job Jörg Brückner have in Görlitz?"
    assert goerlitz.portability_answers == ("list of mayors of Görlitz",)


def test_knowedit():
    result = load_requests(DATA / "knowedit.json")
    assert result.format == "knowedit"
    recent, counterfact, zsre = result.requests
    assert recent.ground_truth is None and recent.rephrase_prompts == ()
    assert recent.locality_answers == ("Anton Kessler", "chemistry")
    # Groups in file order; of a list of alias lists, the first string.
    assert recent.portability_answers == ("no", "Europe", "Vienna")
    assert recent.portability_prompts[2] == "The place of death of Leo Kessler is"
    assert counterfact.ground_truth == "mayor of Gothenburg"
    assert counterfact.rephrase_prompts == ("Marta Lindqvist held the position of",)
    assert counterfact.locality_answers == ("female", "mayor of Gothenburg")
    assert zsre.ground_truth == "Aspidoceratidae"  # a list in the file
    assert zsre.locality_prompts == ("The taxon rank of Epaspidoceras is", "Epaspidoceras taxon rank")
    assert zsre.portability_answers == ("Owlet moths",)


def test_knowedit_wikibio_names_its_fields_text_labels_concept():
    # KnowEdit's WikiBio set: ``text`` is the prompt, ``labels`` the new text, ``concept`` the subject.
    result = load_requests(DATA / "knowedit_wikibio.json")
    assert result.format == "knowedit"
    vane, solberg = result.requests
    assert vane.prompt.startswith("This is a Wikipedia passage about edmund hartley vane.")
    assert vane.target_new.startswith("He studied at the University of Edinburgh")
    assert vane.subject == "edmund hartley vane" and vane.ground_truth is None
    assert vane.locality_prompts[1] == "edmund hartley vane field of work"
    assert vane.locality_answers == ("botany", "botany")
    assert solberg.locality_answers == ("Norway",)


def test_plain_jsonl_scalars_lists_and_whitespace():
    result = load_requests(DATA / "plain.jsonl")
    assert result.format == "plain"
    australia, everest, gold = result.requests
    assert australia == EditRequest(
        prompt="The capital of Australia is",
        target_new="Sydney",
        subject="Australia",
        ground_truth="Canberra",
        rephrase_prompts=("Australia's capital city is", "The capital city of Australia is"),
        locality_prompts=("The capital of Japan is",),
        locality_answers=("Tokyo",),
        relation="capital",
    )
    assert everest.prompt == "The tallest mountain on Earth is"
    assert everest.rephrase_prompts == ("The highest mountain in the world is",)  # a scalar in the file
    assert everest.portability_answers == ("Karakoram",)
    assert gold.locality_prompts == () and gold.ground_truth == "Au"


def test_plain_csv_with_field_map():
    field_map = {
        "prompt": "question",
        "target_new": "answer",
        "ground_truth": "old_answer",
        "rephrase_prompts": ["paraphrase_1", "paraphrase_2"],
        "locality_prompts": "neighbor",
        "locality_answers": "neighbor_answer",
    }
    result = load_requests(DATA / "plain.csv", field_map=field_map)
    assert result.format == "plain"
    hamlet, planet, ocean = result.requests
    assert hamlet == EditRequest(
        prompt="Who wrote Hamlet?",
        target_new="Christopher Marlowe",
        ground_truth="William Shakespeare",
        rephrase_prompts=("Hamlet was written by whom?", "Who is the author of Hamlet?"),
        locality_prompts=("Who wrote Don Quixote?",),
        locality_answers=("Miguel de Cervantes",),
    )
    assert planet.prompt == "Which planet is known as the Red Planet, in English?"  # quoted comma
    assert planet.rephrase_prompts == ("Which planet is called the Red Planet?",)  # empty cells: absent
    assert planet.locality_prompts == ()
    assert (ocean.prompt, ocean.target_new) == ("What is the largest ocean?", "Atlantic Ocean")


def test_csv_in_our_field_names_is_detected(tmp_path):
    path = tmp_path / "edits.csv"
    path.write_text("prompt,target_new,subject\nThe capital of Peru is,Quito,Peru\n")
    result = load_requests(path)
    assert result.format == "plain"
    assert result.requests == [EditRequest("The capital of Peru is", "Quito", subject="Peru")]


# --- auto-detection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("zsre_mend.json", "zsre"),
        ("counterfact_rome.json", "counterfact"),
        ("counterfact_easyedit.json", "easyedit"),
        ("wikibigedit.json", "wikibigedit"),
        ("knowedit.json", "knowedit"),
        ("knowedit_wikibio.json", "knowedit"),
        ("plain.jsonl", "plain"),
    ],
)
def test_auto_detection_matches_the_named_format(name, expected):
    detected = load_requests(DATA / name)
    named = load_requests(DATA / name, format=expected)
    assert detected.format == named.format == expected
    assert detected.requests == named.requests


def test_detect_format_from_keys():
    assert detect_format({"requested_rewrite", "case_id"}) == "counterfact"
    assert detect_format({"src", "alt", "answers"}) == "zsre"
    assert detect_format({"update", "ans", "subject"}) == "wikibigedit"
    assert detect_format({"prompt", "target_new", "locality"}) == "knowedit"
    assert detect_format({"prompt", "target_new", "locality_prompt", "case_id"}) == "easyedit"
    assert detect_format({"prompt", "target_new", "locality_prompt", "portability"}) == "easyedit"
    assert detect_format({"prompt", "target_new", "rephrase_prompts", "case_id"}) == "plain"
    assert detect_format({"prompt", "target_new", "subject"}) == "plain"
    assert detect_format({"text", "labels", "concept", "locality"}) == "knowedit"  # KnowEdit's WikiBio
    assert detect_format({"question", "answer"}) is None
    assert detect_format({"text", "labels"}) is None  # e.g. a classification set: not WikiBio


# --- precise errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("bad_line.jsonl", "bad_line.jsonl record 2: line 3 is not valid JSON"),
        ("empty_target.jsonl", "empty_target.jsonl record 3: field 'target_new' is empty"),
        ("wrong_type.json", "wrong_type.json record 1: field 'prompt': expected a string, got list"),
        (
            "counterfact_missing_subject.json",
            "counterfact_missing_subject.json record 1: missing field 'requested_rewrite.subject'",
        ),
        (
            "counterfact_no_placeholder.json",
            "counterfact_no_placeholder.json record 0: field 'requested_rewrite.prompt' has no '{}'",
        ),
        ("duplicates.jsonl", "duplicates.jsonl record 3: duplicate of record 0 (same prompt and target_new)"),
        (
            "locality_mismatch.json",
            "locality_mismatch.json record 0: 2 locality_prompts but 1 locality_answers",
        ),
        ("empty.json", "empty.json: the file is empty"),
        ("empty_list.json", "empty_list.json: no records"),
        ("unknown_keys.json", "unknown_keys.json record 0: cannot tell the format from its keys"),
    ],
)
def test_malformed_file_gives_precise_error(name, expected):
    with pytest.raises(RequestError) as error:
        load_requests(BAD / name)
    assert expected in str(error.value)


def test_invalid_json_file_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"prompt": "a", "target_new": "b"},\n  {"prompt": }\n]\n')
    with pytest.raises(RequestError, match=r"broken.json: invalid JSON at line 3 column 14"):
        load_requests(path)


def test_json_lines_under_a_json_name(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text((DATA / "plain.jsonl").read_text())
    assert load_requests(path).requests == load_requests(DATA / "plain.jsonl").requests


def test_wrong_type_in_a_list_names_the_element(tmp_path):
    path = tmp_path / "cf.json"
    record = json.loads((DATA / "counterfact_rome.json").read_text())[0]
    record["paraphrase_prompts"][1] = 7
    path.write_text(json.dumps([record]))
    with pytest.raises(
        RequestError, match=r"record 0: field 'paraphrase_prompts\[1\]': expected a string, got int"
    ):
        load_requests(path)


def test_knowedit_probe_without_answer(tmp_path):
    record = json.loads((DATA / "knowedit.json").read_text())[1]
    del record["locality"]["Forgetfulness"][0]["ground_truth"]
    path = tmp_path / "ke.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(
        RequestError, match=r"record 0: missing field 'locality.Forgetfulness\[0\].ground_truth'"
    ):
        load_requests(path)


def test_unknown_format_lists_the_valid_ones():
    with pytest.raises(RequestError) as error:
        load_requests(DATA / "plain.jsonl", format="rome")
    message = str(error.value)
    assert "unknown format 'rome'" in message
    assert all(name in message for name in ("auto", *FORMATS))


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"field_map": {"question": "prompt"}}, "unknown field 'question'"),
        ({"field_map": {"prompt": ["q1", "q2"]}}, "field_map['prompt']: expected a column name"),
        ({"field_map": {"prompt": "q"}, "format": "zsre"}, "field_map applies to format 'plain' only"),
    ],
)
def test_bad_field_map(kwargs, expected):
    with pytest.raises(RequestError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        load_requests(DATA / "plain.csv", **kwargs)


def test_missing_sources():
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_requests(DATA / "nope.json")
    with pytest.raises(FileNotFoundError, match="no files match"):
        load_requests(str(DATA / "nope" / "*.json"))
    with pytest.raises(RequestError, match="is a directory"):
        load_requests(DATA / "parts")


# --- skipping, limits, globs ---------------------------------------------------------------------


def test_skip_invalid_counts_and_reports_each_record():
    result = load_requests(BAD / "mixed.jsonl", skip_invalid=True)
    assert [r.prompt for r in result.requests] == ["The capital of Peru is", "The capital of Ghana is"]
    assert [index for index, _ in result.skipped] == [1, 2, 3, 4]
    reasons = [reason for _, reason in result.skipped]
    assert "mixed.jsonl record 1: field 'target_new' is empty" in reasons[0]
    assert "record 2: line 3 is not valid JSON" in reasons[1]
    assert "record 3: duplicate of record 0" in reasons[2]
    assert "record 4: expected an object, got list" in reasons[3]


def test_limit_counts_valid_requests():
    result = load_requests(BAD / "mixed.jsonl", skip_invalid=True, limit=1)
    assert len(result.requests) == 1 and result.skipped == []
    assert len(load_requests(DATA / "counterfact_rome.json", limit=2).requests) == 2
    assert load_requests(DATA / "counterfact_rome.json", limit=0).requests == []


def test_glob_concatenates_files_in_sorted_order():
    result = load_requests(str(DATA / "parts" / "*.jsonl"))
    assert [Path(s).name for s in result.sources] == ["a.jsonl", "b.jsonl"]
    assert [r.target_new for r in result.requests] == ["Quito", "Lima", "Bogota", "Kampala", "Lagos"]


def test_glob_duplicate_across_files_names_both(tmp_path):
    (tmp_path / "a.jsonl").write_text((DATA / "parts" / "a.jsonl").read_text())
    (tmp_path / "b.jsonl").write_text(
        '{"prompt": "Q", "target_new": "A"}\n' + (DATA / "parts" / "a.jsonl").read_text()
    )
    pattern = str(tmp_path / "*.jsonl")
    with pytest.raises(RequestError, match=r"b.jsonl record 1: duplicate of .*a.jsonl record 0"):
        load_requests(pattern)
    result = load_requests(pattern, skip_invalid=True)
    assert len(result.requests) == 3
    assert [index for index, _ in result.skipped] == [3, 4]  # counted across both files


def test_glob_of_different_formats_is_refused(tmp_path):
    for name in ("zsre_mend.json", "wikibigedit.json"):
        (tmp_path / name).write_text((DATA / name).read_text())
    with pytest.raises(RequestError, match="is in format 'zsre' but .* is in 'wikibigedit'"):
        load_requests(str(tmp_path / "*.json"))


# --- hub names -----------------------------------------------------------------------------------


def test_hub_name_goes_to_datasets(monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return [{"src": "Who wrote Hamlet?", "alt": "Marlowe", "answers": ["Shakespeare"]}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    result = load_requests("someone/zsre-sample", split="test")
    assert calls == [("someone/zsre-sample", "test")]
    assert result.format == "zsre" and result.requests[0].ground_truth == "Shakespeare"


def test_hub_failure_is_a_clear_error(monkeypatch):
    def load_dataset(name, split):
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(RequestError, match="'someone/missing' is not a local file .*offline"):
        load_requests("someone/missing")


# --- our own format round-trips ------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_save_then_load_round_trips(tmp_path, suffix):
    requests = load_requests(DATA / "knowedit.json").requests + [
        EditRequest("Le capitale de la Côte d'Ivoire est", "Abidjan", relation="capital")
    ]
    path = tmp_path / f"edits{suffix}"
    save_requests(requests, path)
    result = load_requests(path)
    assert result.format == "plain"
    assert result.requests == requests


# --- the committed country edit sets -------------------------------------------------------------


@pytest.mark.parametrize(
    "name, relation, at_least",
    [("country_capitals.json", "capital", 180), ("country_languages.json", "official language", 100)],
)
def test_country_edit_sets(name, relation, at_least):
    requests = load_requests(EXPERIMENT_DATA / name).requests
    assert len(requests) >= at_least
    edited_prompts = {r.prompt for r in requests}
    for r in requests:
        assert r.relation == relation and r.subject in r.prompt
        assert r.target_new != r.ground_truth
        assert not any(c in r.target_new for c in ",()/"), r.target_new
        assert len(r.rephrase_prompts) == 2 and len(r.locality_prompts) == 2
        # Locality asks about held-out countries only: never one that is edited.
        assert not edited_prompts & set(r.locality_prompts)
    if relation == "capital":
        assert requests[0].prompt == "The capital of China is" and requests[0].ground_truth == "Beijing"
        us = next(r for r in requests if r.subject == "United States")
        assert us.prompt == "The capital of the United States is"
        assert us.rephrase_prompts[0] == "The United States' capital city is"


def test_country_edit_sets_regenerate_identically(tmp_path):
    pytest.importorskip("countryinfo")
    from experiments.build_country_edits import build

    counts = build(tmp_path)
    for name, count in counts.items():
        assert (tmp_path / name).read_bytes() == (EXPERIMENT_DATA / name).read_bytes()
        assert len(json.loads((tmp_path / name).read_text())) == count


def test_load_texts_reads_one_passage_per_line_and_names_an_empty_file(tmp_path):
    from locft_jax.data import load_texts

    good = tmp_path / "good.txt"
    good.write_text("First passage.\n\n  \nSecond passage.\n")
    assert load_texts(good) == ["First passage.", "Second passage."]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(RequestError, match="empty.txt: no text"):
        load_texts(empty)
