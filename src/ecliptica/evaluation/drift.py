"""Capability drift: perplexity of held-out benign responses and token KL(model || base), paired
with the base on the same examples.

Default data: the chosen answers of the `benign` pairs in the bundled `demo:preferences` (51; point
`drift.path` at a larger held-out set for a study). Pairs are tokenised by the training code
(`data.tokenize_pairs`) and scored by the training engine's `PolicyModel` (`logprobs.py`), so only
response tokens count and "KL to the base" is the quantity CITA's loss uses:

  perplexity       = exp(sum of response-token NLL / number of response tokens)   (token-weighted)
  perplexity_ratio = perplexity / base perplexity = exp(sum (NLL - base NLL) / tokens)
  kl_mean_token    = sum of token KL(p_model || p_base) / tokens, full vocabulary

Intervals are **paired**: one bootstrap resamples examples, and each resample recomputes the
model's and the base's numbers on the same examples, so example difficulty cancels out of the
ratio and of the KL. Per-example values go to `drift_examples.jsonl` (ids included) so two arms can
be compared paired too (`paired_difference`).
Without an adapter the model is the base: KL = 0 and the ratio is 1 by definition (no second pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ecliptica.data import PreferenceExample, load_preferences, resolve_path
from ecliptica.evaluation.config import DriftSection
from ecliptica.evaluation.inputs import tokenize_scored_pairs
from ecliptica.evaluation.logprobs import sequence_scores
from ecliptica.evaluation.stats import iid_indices, percentile_interval


def load_benign_pairs(
    path: str = "demo:preferences", format: str = "generic", category: str | None = "benign", limit: int | None = None
) -> list[PreferenceExample]:
    """Preference pairs whose chosen answers are benign; `category=None` keeps every pair."""
    examples = load_preferences(resolve_path(path), format).examples
    if category is not None:
        examples = [e for e in examples if e.category == category]
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise ValueError(
            f"{path}: no pairs with category {category!r} for the drift check "
            "(set drift.category: null to use every pair)"
        )
    return examples


def token_scores(
    handle, examples: Sequence[PreferenceExample], s: DriftSection, progress: bool = True
) -> dict[str, np.ndarray]:
    """Per example: summed response NLL under the model and the base, summed token KL, token count."""
    pairs = tokenize_scored_pairs(handle.tokenizer, examples, s)
    sc = sequence_scores(
        handle, pairs, with_rejected=False, batch_size=s.batch_size, token_kl=True, progress=progress, desc="drift"
    )
    return {
        "id": np.array([e.row_id for e in examples]),
        "nll": -sc["logp_chosen"],
        "ref_nll": -sc["ref_logp_chosen"],
        "kl": sc["kl_chosen"],
        "tokens": sc["n_chosen"],
    }


def _paired_resamples(scores: dict[str, np.ndarray], n_resamples: int, seed: int) -> dict[str, np.ndarray]:
    """Token-weighted sums over the same resampled examples for model and base."""
    idx = iid_indices(scores["tokens"].size, n_resamples, seed)
    tokens = scores["tokens"][idx].sum(1)
    return {k: scores[k][idx].sum(1) / tokens for k in ("nll", "ref_nll", "kl")}


def drift_metrics(
    scores: dict[str, np.ndarray],
    s: DriftSection,
    has_adapter: bool,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    nll, ref_nll, kl, tokens = scores["nll"], scores["ref_nll"], scores["kl"], scores["tokens"]
    total = tokens.sum()
    ppl, base_ppl = float(np.exp(nll.sum() / total)), float(np.exp(ref_nll.sum() / total))
    ratio = float(np.exp((nll.sum() - ref_nll.sum()) / total))
    boot = _paired_resamples(scores, n_resamples, seed)
    ci = lambda x: dict(zip(("low", "high"), percentile_interval(x, alpha)))  # noqa: E731
    result = {
        "n_examples": int(tokens.size),
        "n_response_tokens": int(total),
        "perplexity": ppl,
        "perplexity_ci": ci(np.exp(boot["nll"])),
        "base_perplexity": base_ppl,
        "perplexity_ratio": ratio,
        "perplexity_ratio_ci": ci(np.exp(boot["nll"] - boot["ref_nll"])) if has_adapter else None,
        "kl_mean_token": float(kl.sum() / total) if has_adapter else 0.0,
        "kl_ci": ci(boot["kl"]) if has_adapter else None,
        "ci_method": "percentile bootstrap over examples, model and base resampled together (paired)",
        "collapse_ratio": s.collapse_ratio,
        "collapsed": bool(ratio > s.collapse_ratio),
        "placement": s.placement,
    }
    if not has_adapter:
        result["note"] = "no adapter: the evaluated model is the base (KL = 0, ratio = 1 by definition)"
    return result


def run_drift(
    handle,
    examples: Sequence[PreferenceExample],
    s: DriftSection,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, per-example records) for the handle's current model against its base."""
    scores = token_scores(handle, examples, s, progress)
    metrics = drift_metrics(scores, s, handle.adapter_path is not None, n_resamples=n_resamples, seed=seed)
    records = [
        {"id": str(i), "tokens": int(t), "nll": float(a), "base_nll": float(b), "kl": float(k)}
        for i, t, a, b, k in zip(scores["id"], scores["tokens"], scores["nll"], scores["ref_nll"], scores["kl"])
    ]
    return metrics, records


def paired_difference(
    a: Sequence[dict[str, Any]],
    b: Sequence[dict[str, Any]],
    key: str = "nll",
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Token-weighted mean of `key` (nll or kl) for arm a minus arm b, on the same examples (matched by
    id; `drift_examples.jsonl` records), with a paired percentile bootstrap interval over examples."""
    by_id = {r["id"]: r for r in b}
    missing = [r["id"] for r in a if r["id"] not in by_id]
    if missing or len(a) != len(b):
        raise ValueError(
            f"paired drift comparison needs the same examples; {len(missing)} ids of a are not in b "
            f"(e.g. {missing[:3]}), sizes {len(a)} and {len(b)}"
        )
    tokens = np.array([r["tokens"] for r in a], dtype=float)
    diff = np.array([r[key] - by_id[r["id"]][key] for r in a])
    idx = iid_indices(tokens.size, n_resamples, seed)
    low, high = percentile_interval(diff[idx].sum(1) / tokens[idx].sum(1), alpha)
    return {
        "key": key,
        "difference": float(diff.sum() / tokens.sum()),
        "low": low,
        "high": high,
        "n_examples": int(tokens.size),
    }
