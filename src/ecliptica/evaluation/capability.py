"""Capability beyond perplexity: zero-shot multiple-choice accuracy by log-likelihood.

Each choice is scored by the log-probability of its continuation given the question's context, summed over
the continuation's tokens by the training engine's `PolicyModel` (`logprobs.sequence_scores`), on plain text
(no chat template, no special tokens: lm-evaluation-harness's convention for log-likelihood tasks). The
context and the continuation are tokenised separately and concatenated, so the boundary is the same for
every choice. Templates (`capability.template`):

* `cloze`: context `"Question: {question}\\nAnswer:"`, continuations `" {choice text}"`;
* `letters`: context `"{question}\\nA. {A}\\nB. {B}\\n...\\nAnswer:"`, continuations `" A"`, `" B"`, ...

Two accuracies per set, as lm-evaluation-harness names them: `accuracy_sum` (argmax of the summed log-prob,
its `acc`) and `accuracy` (argmax of log-prob / UTF-8 bytes of the continuation, its `acc_norm`: longer
choices are not penalised for their length). `accuracy` is the headline; with `letters` both are the same.
Ties go to the first choice (numpy's argmax), as in the harness.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ecliptica.data import TokenizedPair
from ecliptica.evaluation.config import CapabilitySection
from ecliptica.evaluation.logprobs import sequence_scores
from ecliptica.evaluation.mcq_data import McqQuestion, balanced_questions, load_mcq, questions_hash
from ecliptica.evaluation.stats import wilson_interval


def context_of(q: McqQuestion, template: str) -> str:
    if template == "cloze":
        return f"Question: {q.question}\nAnswer:"
    options = "".join(f"{chr(ord('A') + i)}. {c}\n" for i, c in enumerate(q.choices))
    return f"{q.question}\n{options}Answer:"


def continuations_of(q: McqQuestion, template: str) -> list[str]:
    if template == "cloze":
        return [f" {c}" for c in q.choices]
    return [f" {chr(ord('A') + i)}" for i in range(len(q.choices))]


def encode_choices(
    tokenizer, questions: Sequence[McqQuestion], template: str, max_length: int
) -> tuple[list[TokenizedPair], int]:
    """One (context, continuation) pair per choice, in question order; and how many questions had their
    context cut (from the start: the end of the context, next to the answer, is kept)."""
    pairs, truncated = [], 0
    for q in questions:
        context = context_of(q, template)
        ctx = _ids(tokenizer, context)
        conts = [_continuation_ids(tokenizer, context, ctx, c) for c in continuations_of(q, template)]
        room = max_length - max(len(c) for c in conts)
        if room < 1:
            raise ValueError(f"{q.row_id}: a choice is longer than capability.max_length={max_length} tokens")
        if len(ctx) > room:
            ctx, truncated = ctx[-room:], truncated + 1
        pairs += [TokenizedPair(tuple(ctx), tuple(c), (), f"{q.row_id}/{j}") for j, c in enumerate(conts)]
    return pairs, truncated


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _continuation_ids(tokenizer, context: str, context_ids: list[int], continuation: str) -> list[int]:
    """The continuation's tokens as they fall after the context (lm-evaluation-harness: encode the whole and
    split at the context's length), so a leading space is tokenised as in running text; where the whole's
    tokens do not start with the context's (a merge across the boundary), the continuation on its own."""
    whole = _ids(tokenizer, context + continuation)
    if whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids):
        return whole[len(context_ids) :]
    return _ids(tokenizer, continuation)


def predictions(logps: np.ndarray, n_bytes: np.ndarray, sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(argmax of summed log-prob, argmax of log-prob per byte) per question; `logps` and `n_bytes` are flat
    over every question's choices, `sizes` the number of choices of each question."""
    bounds = np.cumsum([0, *sizes])
    by_sum = [int(np.argmax(logps[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]
    by_byte = [int(np.argmax(logps[a:b] / n_bytes[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]
    return np.array(by_sum), np.array(by_byte)


def _accuracy(correct: np.ndarray, alpha: float) -> dict[str, Any]:
    k, n = int(correct.sum()), int(correct.size)
    low, high = wilson_interval(k, n, alpha)
    return {"rate": k / n, "correct": k, "total": n, "wilson_low": low, "wilson_high": high}


def score_questions(
    handle, questions: Sequence[McqQuestion], cfg: CapabilitySection, *, alpha: float, progress: bool, desc: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(accuracies with Wilson intervals, one row per question) of the evaluated model on `questions`."""
    pairs, truncated = encode_choices(handle.tokenizer, questions, cfg.template, cfg.max_length)
    logps = sequence_scores(
        handle, pairs, with_rejected=False, batch_size=cfg.batch_size, progress=progress, desc=desc, reference=False
    )["logp_chosen"]
    n_bytes = np.array([len(c.encode()) for q in questions for c in continuations_of(q, cfg.template)], dtype=float)
    sizes = [len(q.choices) for q in questions]
    by_sum, by_byte = predictions(logps, n_bytes, sizes)
    answers = np.array([q.answer for q in questions])
    correct = by_byte == answers
    result = {
        "accuracy": _accuracy(correct, alpha),
        "accuracy_sum": _accuracy(by_sum == answers, alpha),
        "chance": float(np.mean([1.0 / k for k in sizes])),
        # per question, in order: 1 = right under `accuracy`; the study pairs arms on it (alignment tax)
        "correct": "".join("1" if c else "0" for c in correct),
        "contexts_truncated": truncated,
    }
    bounds = np.cumsum([0, *sizes])
    rows = [
        {
            "id": q.row_id,
            "answer": q.answer_letter,
            "predicted": chr(ord("A") + int(by_byte[i])),
            "predicted_sum": chr(ord("A") + int(by_sum[i])),
            "logps": [float(x) for x in logps[bounds[i] : bounds[i + 1]]],
        }
        for i, q in enumerate(questions)
    ]
    return result, rows


def run_capability(
    handle, cfg: CapabilitySection, *, alpha: float = 0.05, progress: bool = True
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Every set of `cfg.sets`: ({set: result with provenance and settings}, {set: per-question rows})."""
    results, rows = {}, {}
    for s in cfg.sets:
        t = time.perf_counter()
        questions, provenance = load_mcq(s.name, s.path, on_bad_row=s.on_bad_row)
        subset, balanced_over = balanced_questions(questions, s.limit, cfg.seed)
        result, rows[s.name] = score_questions(
            handle, subset, cfg, alpha=alpha, progress=progress, desc=f"capability {s.name}"
        )
        results[s.name] = {
            **result,
            "n_questions": len(subset),
            "n_available": len(questions),
            "balanced_over": balanced_over,
            "subset_seed": cfg.seed,
            "questions_hash": questions_hash(subset),
            "template": cfg.template,
            "scoring": "argmax of log-prob per UTF-8 byte of the continuation (accuracy); summed (accuracy_sum)",
            "provenance": provenance,
            "seconds": time.perf_counter() - t,
        }
    return results, rows


def capability_summary(capability: dict[str, Any] | None) -> dict[str, Any]:
    """The headline keys for eval.json's summary: `accuracy_<set>` with `_low`, `_high` (Wilson) per set."""
    out: dict[str, Any] = {}
    for name, r in (capability or {}).items():
        a = r["accuracy"]
        out.update({f"accuracy_{name}": a["rate"], f"accuracy_{name}_low": a["wilson_low"]})
        out[f"accuracy_{name}_high"] = a["wilson_high"]
    return out
