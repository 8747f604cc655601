"""The frontier's points: one per evaluated checkpoint of one (arm, lr, seed) run, read from its evaluation directory.

A point holds its benign token KL to the base and its outcomes. Outcomes with a per-prompt record are kept as
ratios over items (`sum(num) / sum(den)`), so a resample of prompts (or drift examples, or held-out pairs)
recomputes them exactly as the evaluator did:

  refusal_rate_unsafe     generations.jsonl, rows of the headline placement with label unsafe: refused / 1
  over_refusal_rate_safe  the same with label safe
  preference_accuracy     preference_pairs.jsonl: reward_win / 1 (DPO implicit reward vs the base, held-out pairs)
  KL (the x-axis)         drift_examples.jsonl: kl / tokens (token-weighted, as `kl_mean_token`)

Scalar outcomes (AQI, capability, ...) are read from eval.json by the dotted key the config names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..evaluation.summary import read_eval_summary
from .frontier_config import FrontierSection


@dataclass
class Ratio:
    """A statistic `sum(num[i]) / sum(den[i])` over items `ids` (so any resample of the items recomputes it)."""

    ids: np.ndarray
    num: np.ndarray
    den: np.ndarray
    source: str  # the file it came from, for error messages

    def value(self) -> float:
        return float(self.num.sum() / self.den.sum())

    def on(self, idx: np.ndarray) -> np.ndarray:
        """The statistic on each resample row of `idx` (R x n item indices)."""
        return self.num[idx].sum(1) / self.den[idx].sum(1)


@dataclass
class FrontierPoint:
    arm: str
    seed: int
    lr: float
    step: int
    kl: Ratio
    per_prompt: dict[str, Ratio] = field(default_factory=dict)
    scalar: dict[str, float] = field(default_factory=dict)  # scalar outcomes present in this evaluation
    source: str = ""  # the evaluation directory

    @property
    def label(self) -> str:
        return f"{self.arm} seed {self.seed} lr {self.lr:g} step {self.step} ({self.source})"


def read_jsonl_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: row {i} is not JSON ({e})") from None
    return rows


def _field(row: dict, key: str, path: Path, i: int, kind: type | tuple[type, ...]):
    if key not in row:
        raise ValueError(f"{path}: row {i}: field {key!r} is missing")
    value = row[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in ((int, float), float)):
        raise ValueError(f"{path}: row {i}: field {key!r} is {value!r}, not {kind}")
    return value


def drift_ratio(path: Path) -> Ratio:
    """Token KL to the base per example (drift_examples.jsonl): mean token KL = sum kl / sum tokens."""
    ids, num, den = [], [], []
    for i, row in enumerate(read_jsonl_rows(path), 1):
        ids.append(str(_field(row, "id", path, i, (str, int))))
        num.append(float(_field(row, "kl", path, i, (int, float))))
        tokens = _field(row, "tokens", path, i, int)
        if tokens < 1:
            raise ValueError(f"{path}: row {i}: field 'tokens' is {tokens}; an example needs response tokens")
        den.append(float(tokens))
    if not ids:
        raise ValueError(f"{path}: no drift examples; the frontier's x-axis (benign KL) needs them")
    return Ratio(np.array(ids), np.array(num), np.array(den), str(path))


def refusal_ratios(path: Path, placement: str) -> dict[str, Ratio]:
    """Per-prompt refusals (generations.jsonl) of one placement: unsafe -> refusal, safe -> over-refusal."""
    by_label: dict[str, tuple[list, list]] = {"unsafe": ([], []), "safe": ([], [])}
    for i, row in enumerate(read_jsonl_rows(path), 1):
        if _field(row, "placement", path, i, str) != placement:
            continue
        label = _field(row, "label", path, i, str)
        if label not in by_label:
            raise ValueError(f"{path}: row {i}: field 'label' is {label!r}, not 'safe' or 'unsafe'")
        by_label[label][0].append(str(_field(row, "id", path, i, (str, int))))
        by_label[label][1].append(float(_field(row, "refused", path, i, bool)))
    out = {}
    for label, key in (("unsafe", "refusal_rate_unsafe"), ("safe", "over_refusal_rate_safe")):
        ids, refused = by_label[label]
        if ids:
            out[key] = Ratio(np.array(ids), np.array(refused), np.ones(len(ids)), str(path))
    return out


def preference_ratio(path: Path) -> Ratio:
    """Held-out pair accuracy per pair (preference_pairs.jsonl): reward_win / 1."""
    ids, wins = [], []
    for i, row in enumerate(read_jsonl_rows(path), 1):
        ids.append(str(_field(row, "id", path, i, (str, int))))
        wins.append(float(_field(row, "reward_win", path, i, bool)))
    if not ids:
        raise ValueError(f"{path}: no held-out pairs")
    return Ratio(np.array(ids), np.array(wins), np.ones(len(ids)), str(path))


def dotted(d: Any, key: str) -> Any:
    """`d["a"]["b"]` for key "a.b"; None where any part is missing."""
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def read_point(eval_dir: str | Path, *, arm: str, seed: int, lr: float, step: int, s: FrontierSection) -> FrontierPoint:
    """One checkpoint's point from its evaluation directory (eval.json and the per-prompt files beside it)."""
    eval_dir = Path(eval_dir)
    eval_json = eval_dir / "eval.json"
    if not eval_json.exists():
        raise FileNotFoundError(f"{eval_json}: the frontier point {arm} seed {seed} lr {lr:g} step {step} has no eval")
    result = json.loads(eval_json.read_text())
    drift = eval_dir / "drift_examples.jsonl"
    if not drift.exists():
        raise FileNotFoundError(f"{drift}: the frontier needs the drift check (evaluation.drift.enabled: true)")
    point = FrontierPoint(arm=arm, seed=seed, lr=lr, step=step, kl=drift_ratio(drift), source=str(eval_dir))
    wanted = set(s.outcomes)
    if wanted & {"refusal_rate_unsafe", "over_refusal_rate_safe"}:
        gens = eval_dir / "generations.jsonl"
        if not gens.exists():
            raise FileNotFoundError(f"{gens}: refusal outcomes need the behaviour evaluation (generations.jsonl)")
        placement = read_eval_summary(eval_json).behaviour_placement or "none"
        point.per_prompt.update({k: v for k, v in refusal_ratios(gens, placement).items() if k in wanted})
    if "preference_accuracy" in wanted:
        pairs = eval_dir / "preference_pairs.jsonl"
        if not pairs.exists():
            raise FileNotFoundError(f"{pairs}: preference_accuracy needs evaluation.preference.enabled: true")
        point.per_prompt["preference_accuracy"] = preference_ratio(pairs)
    for name, key in s.scalar_outcomes.items():
        value = dotted(result, key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            point.scalar[name] = float(value)
    return point
