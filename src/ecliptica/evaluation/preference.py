"""Held-out preference accuracy: does the trained model prefer the chosen answer of pairs it never saw?

For every pair, with log-probs summed over response tokens by the training engine (`logprobs.py`)
and the base (adapter disabled) as reference, DPO's implicit reward is

  r(y) = beta * (log pi(y | x) - log pi_base(y | x))

* `reward_accuracy` = share of pairs with r(chosen) > r(rejected) (TRL's `rewards/accuracies`);
  ties count as wrong, as in TRL. Undefined for the base itself (every reward is 0).
* `reward_margin` = mean of r(chosen) - r(rejected) (TRL's `rewards/margins`); scales with beta.
* `logp_accuracy` = share of pairs with log pi(chosen) > log pi(rejected): the raw likelihood
  preference, defined for every model including the base (it favours short answers).

The numbers mean "held-out" only if `preference.path` holds pairs the arm was not trained on; the
evaluator cannot check that, the study config must.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ecliptica.data import PreferenceExample, load_preferences, resolve_path
from ecliptica.evaluation.config import PreferenceSection
from ecliptica.evaluation.inputs import tokenize_scored_pairs
from ecliptica.evaluation.logprobs import sequence_scores
from ecliptica.evaluation.stats import iid_indices, percentile_interval, wilson_interval
from ecliptica.runio import write_jsonl


def load_preference_pairs(s: PreferenceSection) -> list[PreferenceExample]:
    examples = load_preferences(resolve_path(s.path), s.format).examples
    examples = examples[: s.limit] if s.limit else examples
    if not examples:
        raise ValueError(f"{s.path}: no preference pairs for preference accuracy")
    return examples


def preference_metrics(
    logp_c: np.ndarray,
    logp_r: np.ndarray,
    ref_c: np.ndarray,
    ref_r: np.ndarray,
    beta: float,
    has_adapter: bool,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    n = logp_c.size
    margins = beta * ((logp_c - ref_c) - (logp_r - ref_r))
    wins, logp_wins = margins > 0, logp_c > logp_r
    idx = iid_indices(n, n_resamples, seed)
    interval = lambda x: dict(zip(("low", "high"), percentile_interval(x[idx].mean(1), alpha)))  # noqa: E731
    wilson = lambda k: dict(zip(("wilson_low", "wilson_high"), wilson_interval(int(k), n, alpha)))  # noqa: E731
    out: dict[str, Any] = {
        "n_pairs": int(n),
        "beta": beta,
        "logp_accuracy": float(logp_wins.mean()),
        "logp_accuracy_ci": {**interval(logp_wins), **wilson(logp_wins.sum())},
        "reward_accuracy": None,
        "reward_margin": None,
    }
    if has_adapter:
        out.update(
            reward_accuracy=float(wins.mean()),
            reward_accuracy_ci={**interval(wins), **wilson(wins.sum())},
            reward_margin=float(margins.mean()),
            reward_margin_ci=interval(margins),
            rewards_chosen=float(beta * (logp_c - ref_c).mean()),
            rewards_rejected=float(beta * (logp_r - ref_r).mean()),
        )
    else:
        out["note"] = "no adapter: the model is its own reference, every implicit reward is 0"
    return out


def run_preference(
    handle,
    examples: Sequence[PreferenceExample],
    s: PreferenceSection,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    progress: bool = True,
    pairs_path: str | Path | None = None,
) -> dict[str, Any]:
    """Metrics over the pairs; with `pairs_path`, one jsonl record per pair too (what a paired resample of pairs,
    e.g. the study's matched-drift frontier, needs: `reward_win` is this pair's vote in `reward_accuracy`)."""
    pairs = tokenize_scored_pairs(handle.tokenizer, examples, s)
    sc = sequence_scores(
        handle, pairs, with_rejected=True, batch_size=s.batch_size, progress=progress, desc="preference"
    )
    out = preference_metrics(
        sc["logp_chosen"],
        sc["logp_rejected"],
        sc["ref_logp_chosen"],
        sc["ref_logp_rejected"],
        s.beta,
        handle.adapter_path is not None,
        n_resamples=n_resamples,
        seed=seed,
    )
    out.update(path=s.path, placement=s.placement)
    if pairs_path is not None:
        margins = s.beta * (
            (sc["logp_chosen"] - sc["ref_logp_chosen"]) - (sc["logp_rejected"] - sc["ref_logp_rejected"])
        )
        write_jsonl(
            pairs_path,
            [
                {"id": p.row_id, "reward_margin": float(m), "reward_win": bool(m > 0), "logp_win": bool(c > r)}
                for p, m, c, r in zip(pairs, margins, sc["logp_chosen"], sc["logp_rejected"])
            ],
        )
    return out
