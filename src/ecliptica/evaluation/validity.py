"""Does an AQI variant follow behaviour? Spearman across a study's arms, with bootstrap CIs over arms and seeds.

Input: one row per (set, arm, seed) with every AQI variant and the behaviour rates (eval.json `summary`).
Behaviours: refusal of unsafe prompts, over-refusal of safe ones, and their difference (the useful-safety
margin). Spearman is taken across arms (each arm's mean over its seeds); its interval resamples arms with
replacement, then seeds within each resampled arm (two stages, as the study's contrasts do), and is the
percentile interval of rho. Dev and test are computed apart: `choose_headline` reads dev only, by the rule
written in docs/aqi.md before any study result.

    python -m ecliptica.evaluation.validity STUDY_DIR [--n-resamples 2000] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

# candidates for the headline, simplest first (fewest things fitted: none < an LDA direction < layer weights
# + a direction; a single position before a pooled span): the order that breaks a dev tie
CANDIDATES = (
    "aqi_geometric",
    "aqi_geometric_last_prompt",
    "aqi_geometric_completion",
    "aqi_prompt",
    "aqi_last_prompt",
    "aqi_completion",
    "aqi_geometric_learned",
    "aqi_learned",
)
CONTROLS = ("aqi_completion_lexical", "aqi_geometric_completion_lexical", "aqi_lexical")  # reported, never chosen
BEHAVIOURS = ("refusal_rate_unsafe", "over_refusal_rate_safe", "refusal_minus_over_refusal")
RULE_BEHAVIOUR = "refusal_minus_over_refusal"
TIE = 0.05  # dev rhos within this of the best are a tie, broken toward the simpler variant
AIM = 0.8  # rho with refusal − over-refusal on test


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho (Pearson of average ranks, as scipy.stats.spearmanr); None when either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(rankdata(x), rankdata(y))[0, 1])


def with_margin(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row with `refusal_minus_over_refusal` added (None when either rate is missing)."""
    r, o = row.get("refusal_rate_unsafe"), row.get("over_refusal_rate_safe")
    return {**row, RULE_BEHAVIOUR: None if r is None or o is None else r - o}


def _arm_means(by_arm: Mapping[str, Sequence[Mapping]], key: str, seeds: Mapping[str, Sequence[int]] | None = None):
    """Per arm, the mean over its seeds (or over the resampled seed indices)."""
    out = []
    for arm, rows in by_arm.items():
        picks = seeds[arm] if seeds is not None else range(len(rows))
        out.append(float(np.mean([rows[i][key] for i in picks])))
    return np.array(out)


def validity_table(
    rows: Sequence[Mapping[str, Any]],
    variants: Sequence[str] | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> list[dict[str, Any]]:
    """One entry per (set, variant, behaviour): rho across arms, its two-stage bootstrap interval, n arms/runs.

    `rows`: dicts with `set`, `arm`, `seed` and the numbers; a row missing a number is an error (naming it),
    never dropped silently. A resample whose ranks are constant on one side is skipped and counted.
    """
    rows = [with_margin(r) for r in rows]
    variants = list(variants) if variants is not None else [v for v in (*CANDIDATES, *CONTROLS) if v in rows[0]]
    out = []
    for eval_set in sorted({r["set"] for r in rows}):
        by_arm: dict[str, list[Mapping]] = defaultdict(list)
        for r in rows:
            if r["set"] == eval_set:
                by_arm[r["arm"]].append(r)
        for variant in variants:
            for behaviour in BEHAVIOURS:
                for arm, runs in by_arm.items():
                    for r in runs:
                        if r.get(variant) is None or r.get(behaviour) is None:
                            missing = variant if r.get(variant) is None else behaviour
                            raise ValueError(f"set {eval_set!r}, arm {arm!r}, seed {r['seed']}: no {missing!r}")
                out.append(_entry(eval_set, variant, behaviour, by_arm, n_resamples, seed, alpha))
    return out


def _entry(eval_set, variant, behaviour, by_arm, n_resamples, seed, alpha) -> dict[str, Any]:
    rho = spearman(_arm_means(by_arm, variant), _arm_means(by_arm, behaviour))
    arms = list(by_arm)
    rng = np.random.default_rng(seed)
    samples, degenerate = [], 0
    for _ in range(n_resamples):
        picked = rng.integers(len(arms), size=len(arms))
        resampled = {f"{i}": by_arm[arms[a]] for i, a in enumerate(picked)}
        seeds = {k: rng.integers(len(v), size=len(v)) for k, v in resampled.items()}
        r = spearman(_arm_means(resampled, variant, seeds), _arm_means(resampled, behaviour, seeds))
        if r is None:
            degenerate += 1
        else:
            samples.append(r)
    low, high = (
        (float(np.quantile(samples, alpha / 2)), float(np.quantile(samples, 1 - alpha / 2)))
        if samples
        else (None, None)
    )
    return {
        "set": eval_set,
        "variant": variant,
        "behaviour": behaviour,
        "rho": rho,
        "low": low,
        "high": high,
        "n_arms": len(arms),
        "n_runs": sum(len(v) for v in by_arm.values()),
        "resamples": len(samples),
        "resamples_constant": degenerate,
    }


def choose_headline(table: Sequence[Mapping[str, Any]], dev: str = "dev") -> dict[str, Any]:
    """The rule of docs/aqi.md, on the dev set only: the candidate with the highest dev rho with
    refusal − over-refusal; candidates within `TIE` of it tie, and the simplest (CANDIDATES order) wins."""
    rhos = {
        e["variant"]: e["rho"]
        for e in table
        if e["set"] == dev and e["behaviour"] == RULE_BEHAVIOUR and e["variant"] in CANDIDATES and e["rho"] is not None
    }
    if not rhos:
        raise ValueError(f"no candidate variant has a defined rho with {RULE_BEHAVIOUR} on the {dev!r} set")
    best = max(rhos.values())
    tied = [v for v in CANDIDATES if v in rhos and rhos[v] >= best - TIE]
    return {"variant": tied[0], "dev_rho": rhos[tied[0]], "best_dev_rho": best, "tied": tied, "rule": RULE_TEXT}


RULE_TEXT = (
    f"highest dev Spearman with refusal − over-refusal; variants within {TIE} of the best tie and the "
    "simplest wins (validity.CANDIDATES order); lexical controls are never chosen"
)


def test_verdict(table: Sequence[Mapping[str, Any]], variant: str, test: str = "test") -> dict[str, Any]:
    """The chosen variant's test rho with refusal − over-refusal against the aim (rho >= AIM)."""
    e = next(e for e in table if e["set"] == test and e["variant"] == variant and e["behaviour"] == RULE_BEHAVIOUR)
    return {**e, "aim": AIM, "met": e["rho"] is not None and e["rho"] >= AIM}


test_verdict.__test__ = False  # a library function, not a pytest test


# --------------------------------------------------------------------------- a study directory


def study_rows(study_dir: str | Path) -> list[dict[str, Any]]:
    """One row per run and evaluation set from `runs/<arm>-s<seed>/eval/[<set>/]eval.json` (summary)."""
    rows = []
    for path in sorted(Path(study_dir).glob("runs/*/eval/**/eval.json")):
        run = path.relative_to(Path(study_dir) / "runs").parts[0]
        match = re.fullmatch(r"(.+)-s(\d+)", run)
        if match is None:
            raise ValueError(f"{path}: run directory {run!r} is not <arm>-s<seed>")
        parent = path.parent.name
        summary = json.loads(path.read_text())["summary"]
        rows.append(
            {
                "set": "test" if parent == "eval" else parent,
                "arm": match.group(1),
                "seed": int(match.group(2)),
                **{k: summary.get(k) for k in (*CANDIDATES, *CONTROLS, *BEHAVIOURS[:2])},
                # eval.json files from before the explicit name: `aqi` is the prompt-representation AQI
                "aqi_prompt": summary.get("aqi_prompt", summary.get("aqi")),
            }
        )
    if not rows:
        raise ValueError(f"{study_dir}: no runs/*/eval/**/eval.json")
    return rows


def markdown(table: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| set | AQI variant | " + " | ".join(BEHAVIOURS) + " |", "|---|---|" + "---|" * len(BEHAVIOURS)]
    cells: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for e in table:
        text = "n/a" if e["rho"] is None else f"{e['rho']:+.2f}"
        if e["low"] is not None:
            text += f" [{e['low']:+.2f}, {e['high']:+.2f}]"
        cells[(e["set"], e["variant"])][e["behaviour"]] = text
    for (s, v), c in cells.items():
        lines.append(f"| {s} | {v} | " + " | ".join(c.get(b, "") for b in BEHAVIOURS) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study_dir", type=Path)
    ap.add_argument("--n-resamples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the table, the dev choice and the test verdict here")
    a = ap.parse_args(argv)
    rows = study_rows(a.study_dir)
    variants = [v for v in (*CANDIDATES, *CONTROLS) if all(r.get(v) is not None for r in rows)]
    table = validity_table(rows, variants, a.n_resamples, a.seed)
    print(markdown(table))
    result: dict[str, Any] = {"table": table}
    if any(r["set"] == "dev" for r in rows):
        choice = choose_headline(table)
        result.update(choice=choice, verdict=test_verdict(table, choice["variant"]))
        v = result["verdict"]
        print(f"\nchosen on dev: {choice['variant']} (dev rho {choice['dev_rho']:+.2f}); test rho {v['rho']}")
        print(f"aim rho >= {AIM} on test: {'met' if v['met'] else 'NOT met'}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
