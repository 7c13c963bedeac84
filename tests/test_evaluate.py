"""Edit metrics equal an independent transformers (PyTorch) computation; reports are well-formed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
import torch
import transformers

from locft_jax import load_model
from locft_jax.evaluate import (
    EvalResult,
    Metric,
    Snapshot,
    capability,
    evaluate_requests,
    exact_match,
    markdown_table,
    n_gram_entropy,
    normalize_answer,
    score_targets,
    snapshot,
    teacher_forced,
    token_accuracy,
    write_report,
)
from locft_jax.evaluate.edits import KINDS, Probe, _metrics
from locft_jax.evaluate.fluency import n_gram_entropy_of
from locft_jax.generate import truncate_at_stops
from locft_jax.requests import EditRequest
from tests.test_generate import hf_greedy

DATA = Path(__file__).parent / "data" / "capability"

REQUESTS = [
    EditRequest(
        "The capital of France is",
        "Rome",
        rephrase_prompts=("France's capital city is", "The French capital is called"),
        locality_prompts=("The capital of Spain is", "Water boils at"),
        locality_answers=("Madrid", "100 degrees Celsius"),
        portability_prompts=("The Eiffel Tower stands in the capital",),
        portability_answers=("Rome",),
    ),
    EditRequest(
        "The CEO of Apple is",
        "Jane Doe",
        locality_prompts=("The CEO of Microsoft is",),
        locality_answers=("Satya Nadella",),
    ),
    EditRequest("Hi", "there", rephrase_prompts=("Hello",)),
]


# --- independent references, written the way EasyEdit / transformers users write them ----------


def easyedit_tokens(hf: Any, tok: Any, prompt: str, target: str) -> tuple[list[int], list[int], list[float]]:
    """EasyEdit's ``test_prediction_acc`` for one pair: ``prompt + ' ' + target`` tokenized together;
    argmax and log-prob at each target position, and the target labels."""
    ids = tok(prompt + " " + target)["input_ids"]
    n = len(tok(prompt)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0], -1)
    labels = ids[n:]
    rows = logp[n - 1 : -1]
    return rows.argmax(-1).tolist(), labels, [float(rows[i, t]) for i, t in enumerate(labels)]


def easyedit_metrics(pre: Any, post: Any, tok: Any, requests: list[EditRequest]) -> dict[str, float]:
    """Per-request means over prompts, then the mean over requests, for every teacher-forced metric."""
    per_kind: dict[str, list[float]] = {}
    for r in requests:
        groups = {
            "reliability": [(r.prompt, r.target_new)],
            "generalization": [(p, r.target_new) for p in r.rephrase_prompts],
            "portability": list(zip(r.portability_prompts, r.portability_answers, strict=True)),
        }
        for kind, pairs in groups.items():
            accs = []
            for p, t in pairs:
                pred, labels, _ = easyedit_tokens(post, tok, p, t)
                accs.append(np.mean(np.equal(pred, labels)))
            if accs:
                per_kind.setdefault(kind, []).append(float(np.mean(accs)))
        loc = [
            np.mean(np.equal(easyedit_tokens(post, tok, p, a)[0], easyedit_tokens(pre, tok, p, a)[0]))
            for p, a in zip(r.locality_prompts, r.locality_answers, strict=True)
        ]
        if loc:
            per_kind.setdefault("locality", []).append(float(np.mean(loc)))
    return {f"teacher_forced/{k}": float(np.mean(v)) for k, v in per_kind.items()}


def perturbed(params: Any, hf: Any, seed: int = 0, scale: float = 0.05) -> Any:
    """Our params and the torch model with the same noise added to layer 1's down_proj."""
    new = jax.tree.map(lambda x: x, params)  # fresh containers, shared leaves
    w = np.asarray(new["model"]["layers"][1]["mlp"]["down_proj"]["weight"])
    w = w + scale * np.random.default_rng(seed).standard_normal(w.shape).astype(w.dtype)
    new["model"]["layers"][1]["mlp"]["down_proj"]["weight"] = jax.numpy.asarray(w)
    with torch.no_grad():
        hf.model.layers[1].mlp.down_proj.weight.copy_(torch.from_numpy(w))
    return new


# --- answer normalisation and fluency -------------------------------------------------------


@pytest.mark.parametrize(
    "text, want",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  An apple,  a   day. ", "apple day"),
        ("Theater of the Absurd", "theater of absurd"),
        ("U.S.A.", "usa"),
        ("Rome\n", "rome"),
        ("", ""),
    ],
)
def test_normalize_answer(text, want):
    assert normalize_answer(text) == want


def test_exact_match():
    assert exact_match(" Paris", "paris")
    assert exact_match("the Atlantic", ["Pacific", "Atlantic"])
    assert not exact_match("Paris is nice", "Paris")
    assert not exact_match("", "Paris")


def test_n_gram_entropy_matches_easyedit_formula():
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit.
    h2 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    assert n_gram_entropy_of("a b a b") == pytest.approx(np.mean([2 / 3 * h2, 4 / 3 * 1.0]))
    varied = "the quick brown fox jumps over the lazy dog near a river bank today"
    assert n_gram_entropy(["go go go go go go go go", varied]) == pytest.approx(
        np.mean([n_gram_entropy_of("go go go go go go go go"), n_gram_entropy_of(varied)])
    )
    assert n_gram_entropy_of("go go go go go go go go") == 0.0 < n_gram_entropy_of(varied)
    assert n_gram_entropy_of("one") == 0.0


# --- teacher-forced scoring vs transformers ---------------------------------------------------


def test_teacher_forced_scores_match_transformers(tiny_model_dir):
    ours = load_model(tiny_model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    probes = [(p.prompt, p.answer) for p in _all_probes(REQUESTS)]
    scores = score_targets(ours.params, ours.config, ours.tokenizer, *zip(*probes, strict=True), batch_size=4)
    for (prompt, target), s in zip(probes, scores, strict=True):
        pred, labels, logp = easyedit_tokens(hf, ours.tokenizer, prompt, target)
        assert s.target.tolist() == labels
        assert s.predicted.tolist() == pred
        np.testing.assert_allclose(s.logprob, logp, atol=1e-4)
    accs = token_accuracy(ours.params, ours.config, ours.tokenizer, *zip(*probes, strict=True))
    assert accs == [s.accuracy for s in scores]


def test_teacher_forced_compiles_once_per_bucket(tiny_llama_dir):
    ours = load_model(tiny_llama_dir)
    prompts = [f"Prompt number {i} " + "x" * (i % 5) for i in range(30)]
    score_targets(ours.params, ours.config, ours.tokenizer, prompts[:1], ["a"], batch_size=8)
    before = teacher_forced.compile_count()
    score_targets(ours.params, ours.config, ours.tokenizer, prompts, ["an answer"] * 30, batch_size=8)
    assert teacher_forced.compile_count() - before <= 1  # 4 batches, all in one (32, 16) bucket


# --- evaluate_requests ------------------------------------------------------------------------


def _all_probes(requests):
    from locft_jax.evaluate import probes_of

    return probes_of(requests)


@pytest.fixture(scope="module")
def llama_pre_post(tiny_llama_dir):
    """Pre-edit (original) and post-edit (perturbed) tiny llama, ours and transformers."""
    ours = load_model(tiny_llama_dir)
    hf_pre = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    hf_post = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    post = perturbed(ours.params, hf_post)
    return ours, post, hf_pre, hf_post


@pytest.fixture(scope="module")
def evaluated(llama_pre_post) -> tuple[EvalResult, Snapshot]:
    ours, post, _, _ = llama_pre_post
    pre = snapshot(ours.params, ours.config, ours.tokenizer, REQUESTS, batch_size=4)
    result = evaluate_requests(post, ours.config, ours.tokenizer, REQUESTS, pre=pre, batch_size=4)
    return result, pre


def test_teacher_forced_metrics_equal_easyedit_reference(llama_pre_post, evaluated):
    ours, _, hf_pre, hf_post = llama_pre_post
    result, _ = evaluated
    want = easyedit_metrics(hf_pre, hf_post, ours.tokenizer, REQUESTS)
    got = {k: m.value for k, m in result.post.items() if k.startswith("teacher_forced/")}
    assert got == pytest.approx(want, abs=1e-12)
    assert 0 < got["teacher_forced/locality"] < 1, "the perturbation should move some locality argmaxes"
    assert result.post["teacher_forced/generalization"] == Metric(got["teacher_forced/generalization"], 2, 3)
    assert result.post["teacher_forced/locality"].count == 2
    assert result.post["teacher_forced/locality"].prompts == 3


def test_generation_answers_equal_transformers_greedy(llama_pre_post, evaluated):
    ours, _, hf_pre, hf_post = llama_pre_post
    result, _ = evaluated
    rows = [(probe, row) for row in result.per_request for probe in row["probes"]]
    prompts = [p["prompt"] for p, _ in rows]
    for hf, key in ((hf_post, "post_answer"), (hf_pre, "pre_answer")):
        ids = hf_greedy(hf, ours.tokenizer, prompts, 32)
        decoded = [ours.tokenizer.decode(t, skip_special_tokens=True) for t in ids]
        texts = [truncate_at_stops(t, (".", "\n")) for t in decoded]
        assert [p[key] for p, _ in rows] == texts
    for probe, _ in rows:
        if probe["kind"] == "locality":
            assert probe["generation"] == float(exact_match(probe["post_answer"], probe["pre_answer"]))
            assert probe["generation_vs_answer"] == float(exact_match(probe["post_answer"], probe["answer"]))
        else:
            assert probe["generation"] == float(exact_match(probe["post_answer"], probe["answer"]))


def test_pre_edit_locality_is_total_by_construction(llama_pre_post, evaluated):
    ours, _, _, _ = llama_pre_post
    result, pre = evaluated
    assert result.pre["teacher_forced/locality"].value == 1.0
    assert result.pre["generation/locality"].value == 1.0
    # Re-running the unedited model (other object, same numbers) agrees with the snapshot too.
    again = evaluate_requests(ours.params, ours.config, ours.tokenizer, REQUESTS, pre=pre, batch_size=4)
    assert again.post["teacher_forced/locality"].value == 1.0
    assert again.post["generation/locality"].value == 1.0
    assert {k: m.value for k, m in again.post.items()} == {k: m.value for k, m in result.pre.items()}


def test_snapshot_round_trips_and_must_match_requests(tmp_path, llama_pre_post, evaluated):
    ours, post, _, _ = llama_pre_post
    result, pre = evaluated
    pre.save(tmp_path / "pre.json")
    loaded = Snapshot.load(tmp_path / "pre.json")
    assert loaded == pre
    with pytest.raises(ValueError, match="different requests"):
        evaluate_requests(post, ours.config, ours.tokenizer, REQUESTS[:2], pre=loaded, batch_size=4)
    with pytest.raises(ValueError, match="settings"):
        evaluate_requests(post, ours.config, ours.tokenizer, REQUESTS, pre=loaded, max_new_tokens=8)


def test_without_pre_only_pre_free_metrics(llama_pre_post):
    ours, post, _, _ = llama_pre_post
    result = evaluate_requests(post, ours.config, ours.tokenizer, REQUESTS, styles=("teacher_forced",))
    assert result.pre is None
    assert set(result.post) == {
        "teacher_forced/reliability",
        "teacher_forced/generalization",
        "teacher_forced/portability",
    }


def _generation_snapshots(probes: list[tuple], pre_answers: list[str], post_answers: list[str]):
    """(pre, post) snapshots of greedy answers on hand-made probes ``(request, kind, prompt, answer)``."""
    settings = {"styles": ["generation"], "max_new_tokens": 32, "stop_at": ["."]}
    made = [Probe(*p) for p in probes]
    return Snapshot(made, settings, answers=pre_answers), Snapshot(made, settings, answers=post_answers)


def test_aggregation_rules_on_hand_made_snapshots():
    pre, post = _generation_snapshots(
        [(0, "reliability", "p0", "Rome"), (0, "locality", "l0", "Madrid"), (0, "locality", "l1", "Lisbon"),
         (1, "reliability", "p1", "Doe"), (1, "locality", "l2", "Nadella")],
        ["Paris", "Madrid", "Porto", "Cook", "Nadella"],
        ["Rome", "madrid", "Lisbon", "Cook", "Gates"],
    )
    metrics, rows = _metrics(post, pre, 2)
    assert metrics["generation/reliability"] == Metric(0.5, 2, 2)
    # Request 0: madrid==Madrid (1), Lisbon!=Porto (0) -> 0.5; request 1: Gates!=Nadella -> 0.
    assert metrics["generation/locality"] == Metric(0.25, 2, 3)
    assert metrics["generation/locality_vs_answer"] == Metric(0.5, 2, 3)
    # Known before the edit: l0 (Madrid) and l2 (Nadella); still right after: l0 only.
    assert metrics["generation/locality_retained"] == Metric(0.5, 2, 2)
    assert metrics["generation/locality_spill"] == Metric(0.0, 3, 3)  # no answer became "Rome" / "Doe"
    assert rows[1]["metrics"] == {
        "generation/reliability": 0.0,
        "generation/locality": 0.0,
        "generation/locality_vs_answer": 0.0,
    }
    own, _ = _metrics(pre, pre, 2)
    assert own["generation/locality"].value == own["generation/locality_retained"].value == 1.0


def test_locality_spill_counts_answers_that_became_an_edit_target():
    pre, post = _generation_snapshots(
        [(0, "reliability", "p0", "Rome"), (1, "reliability", "p1", "Doe"), (0, "locality", "l0", "Madrid"),
         (0, "locality", "l1", "Lisbon"), (1, "locality", "l2", "Nadella"), (1, "locality", "l3", "Smith")],
        ["Paris", "Cook", "Madrid", "Porto", "Doe", "Smith"],
        ["Rome", "Doe", "the Rome", "Doe", "Doe", "Smyth"],
    )
    metrics, _ = _metrics(post, pre, 2)
    # l0 -> another request's target too ("Rome", articles dropped), l1 -> "Doe": spilled; l2 said
    # "Doe" before the edit already; l3 changed, but not to a target.
    assert metrics["generation/locality_spill"] == Metric(0.5, 4, 4)
    assert "generation/locality_spill" not in _metrics(post, None, 2)[0]


def test_write_report_files_are_well_formed(tmp_path, evaluated):
    result, _ = evaluated
    name = "capability/perplexity"
    result.add_metrics({name: Metric(12.5, 100, 3)}, {name: Metric(11.0, 100, 3)})
    result.add_metrics({"update_action/edit_prompts": Metric(1.7, 2, 2),
                        "update_action/locality_prompts": Metric(0.25, 3, 3)})
    paths = write_report(result, tmp_path / "report")
    data = json.loads(paths["metrics"].read_text())
    assert set(data) == {"settings", "post", "pre", "descriptions"}
    assert data["post"]["teacher_forced/locality"]["prompts"] == 3
    assert data["pre"]["generation/locality"]["value"] == 1.0
    assert data["post"]["capability/perplexity"] == {"value": 12.5, "count": 100, "prompts": 3}
    assert all(data["descriptions"][k] for k in data["post"])
    lines = paths["per_request"].read_text().splitlines()
    assert len(lines) == len(REQUESTS)
    rows = [json.loads(line) for line in lines]
    assert [r["prompt"] for r in rows] == [r.prompt for r in REQUESTS]
    assert rows[0]["target_new"] == "Rome" and "fluency_text" in rows[0]
    assert {p["kind"] for p in rows[0]["probes"]} == set(KINDS)
    assert all("post_answer" in p and "pre_answer" in p for r in rows for p in r["probes"])
    assert "generation/reliability" in rows[2]["metrics"] and "pre_metrics" in rows[2]
    table = paths["markdown"].read_text()
    assert table == markdown_table(result)
    assert table.count("\n") == 2 + len(set(result.post) | set(result.pre))
    assert "| teacher_forced/locality | 100.0% |" in table
    assert "| capability/perplexity | 11 | 12.5 | 100 | 3 |" in table
    # A ratio is a number whatever its size (0.25 is not "25%"); shares are percentages.
    assert "| update_action/edit_prompts | – | 1.7 | 2 | 2 |" in table
    assert "| update_action/locality_prompts | – | 0.25 | 3 | 3 |" in table


# --- capability -------------------------------------------------------------------------------


def test_multiple_choice_matches_transformers_log_likelihood(tiny_llama_dir):
    ours = load_model(tiny_llama_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    records = capability.load_jsonl(DATA / "multiple_choice.jsonl")
    metric, predicted = capability.multiple_choice_accuracy(ours.params, ours.config, ours.tokenizer, records)
    want = []
    for rec in records:
        prompt = capability.QA_TEMPLATE.format(question=rec["question"])
        lls = [sum(easyedit_tokens(hf, ours.tokenizer, prompt, c)[2]) for c in rec["choices"]]
        want.append(int(np.argmax(lls)))
    assert predicted == want
    answers = [1, 0, 2, 1, 1]
    assert [capability.choice_index(r["answer"], 4) for r in records] == answers
    assert metric == Metric(float(np.mean(np.equal(want, answers))), 5, 5)


def test_perplexity_matches_transformers_sliding_windows(tiny_llama_dir):
    ours = load_model(tiny_llama_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    text = (DATA / "text.txt").read_text()
    ids = torch.tensor([ours.tokenizer(text)["input_ids"]])
    window, stride = 128, 64
    # transformers' documented recipe, counting exactly the scored tokens.
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + window, ids.shape[1])
        labels = ids[:, begin:end].clone()
        labels[:, : -(end - prev_end)] = -100
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            nll += float(hf(ids[:, begin:end], labels=labels).loss) * n
        count, prev_end = count + n, end
        if end == ids.shape[1]:
            break
    got = capability.perplexity(ours.params, ours.config, ours.tokenizer, text, window, stride)
    assert got.count == count == ids.shape[1] - 1
    assert got.value == pytest.approx(math.exp(nll / count), rel=1e-5)
    # One window holding the whole text: the plain full-sequence perplexity.
    short = ids[:, :200]
    full = capability.perplexity(ours.params, ours.config, ours.tokenizer, text[:200], 256)
    with torch.no_grad():
        want = math.exp(float(hf(short, labels=short).loss))
    assert full.value == pytest.approx(want, rel=1e-5) and full.prompts == 1


def test_perplexity_windows_cover_each_token_once():
    pairs = capability.perplexity_windows(list(range(10)), window=4, stride=2)
    scored = [t for p in pairs for t in p.target_ids]
    assert scored == list(range(1, 10))
    assert all(1 <= len(p.prompt_ids) and len(p.prompt_ids) + len(p.target_ids) <= 4 for p in pairs)
    # Non-overlapping windows leave each window's first token unscored (it is only context).
    assert [t for p in capability.perplexity_windows(list(range(10)), 4, 4) for t in p.target_ids] == [
        1, 2, 3, 5, 6, 7, 9,
    ]


def test_generation_tasks_match_transformers_greedy(tiny_llama_dir):
    ours = load_model(tiny_llama_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tok = ours.tokenizer
    for name, fn, stops in (
        ("gsm8k.jsonl", capability.gsm8k_exact_match, ("\n\n", "Question:")),
        ("nq.jsonl", capability.qa_exact_match, (".", "\n")),
    ):
        records = capability.load_jsonl(DATA / name)
        metric, answers = fn(ours.params, ours.config, tok, records, max_new_tokens=12)
        prompts = [capability.QA_TEMPLATE.format(question=r["question"]) for r in records]
        ids = hf_greedy(hf, tok, prompts, 12)
        assert answers == [truncate_at_stops(tok.decode(t, skip_special_tokens=True), stops) for t in ids]
        assert metric.count == len(records)
    metrics = capability.evaluate_capability(
        ours.params, ours.config, tok, DATA / "multiple_choice.jsonl", text=DATA / "text.txt", window=128
    )
    assert set(metrics) == {"capability/multiple_choice_accuracy", "capability/perplexity"}


def test_gsm8k_and_qa_answer_parsing():
    assert capability.gsm8k_reference("so 2 * 1250 = 2,500.\n#### 2,500") == "2500"
    assert capability.last_number("He pays $1,250 then 30.5 more.") == "30.5"
    assert capability.last_number("no digits") is None
    assert capability.same_number("7.0", "7") and not capability.same_number(None, "7")
    assert capability.qa_references({"answers": ["eight", "8"]}) == ["eight", "8"]
    assert capability.qa_references({"answer": "Canberra"}) == ["Canberra"]
    with pytest.raises(ValueError, match="####"):
        capability.gsm8k_reference("7")
    with pytest.raises(ValueError, match="not one of 4"):
        capability.choice_index("E", 4)


# --- SmolLM2-135M-Instruct --------------------------------------------------------------------

SMOL_REQUESTS = [
    EditRequest(
        "The capital of France is",
        "Rome",
        rephrase_prompts=("France's capital city is",),
        locality_prompts=("The capital of Italy is", "The capital of Germany is"),
        locality_answers=("Rome", "Berlin"),
    ),
    EditRequest(
        "The Eiffel Tower is located in",
        "London",
        locality_prompts=("The largest planet in the solar system is",),
        locality_answers=("Jupiter",),
        portability_prompts=("The Eiffel Tower is in the country of",),
        portability_answers=("England",),
    ),
]


@pytest.mark.slow
def test_smollm2_metrics_equal_transformers(smollm2, smollm2_hf):
    styles = ("teacher_forced", "generation")
    m = smollm2
    result = evaluate_requests(m.params, m.config, m.tokenizer, SMOL_REQUESTS, pre=m.params, styles=styles)
    want = easyedit_metrics(smollm2_hf, smollm2_hf, smollm2.tokenizer, SMOL_REQUESTS)
    got = {k: m.value for k, m in result.post.items() if k.startswith("teacher_forced/")}
    assert got == pytest.approx(want, abs=1e-12)
    assert result.post["teacher_forced/locality"].value == result.post["generation/locality"].value == 1.0
    probes = [p for row in result.per_request for p in row["probes"]]
    decoded = [
        smollm2.tokenizer.decode(t, skip_special_tokens=True)
        for t in hf_greedy(smollm2_hf, smollm2.tokenizer, [p["prompt"] for p in probes], 32)
    ]
    assert [p["post_answer"] for p in probes] == [truncate_at_stops(t, (".", "\n")) for t in decoded]
    # The real model knows some of the unrelated facts; none changes without an edit.
    assert result.post["generation/locality_retained"].count >= 1
    assert result.post["generation/locality_retained"].value == 1.0
