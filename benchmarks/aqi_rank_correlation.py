"""Does an AQI variant rank a study's arms the way their behaviour does? Spearman rho across arms.

Reads every run's `eval.json` on one evaluation set (`runs/<arm>-s<seed>/eval/[SET/]eval.json`), averages
each number over an arm's seeds, and prints Spearman's rank correlation (scipy.stats.spearmanr)
across arms between each AQI variant in `summary` (`aqi` = discriminant, headline band;
`aqi_geometric`; `aqi_lexical` = discriminant at layer 0; `aqi_geometric_lexical`; `probe_auroc`)
and the refusal rate on unsafe prompts, the over-refusal rate on safe prompts and the token KL to
the base (drift), for each placement variant found.

    PYTHONPATH=src python benchmarks/aqi_rank_correlation.py runs/study_smollm_hh [--set dev|test] [--per-run]

With few arms (9) a rho needs |rho| > ~0.7 to differ from 0 at p < 0.05; the p-values are printed.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

AQI_KEYS = ("aqi", "aqi_geometric", "aqi_lexical", "aqi_geometric_lexical", "probe_auroc")


def load_runs(study_dir: Path, eval_set: str) -> dict[str, dict]:
    """run id -> eval.json summary on one evaluation set; the run id is the directory under `runs/`.
    A study with `evaluation_sets` writes `runs/RUN/eval/SET/eval.json`; one without, `runs/RUN/eval/eval.json`.
    Sets are never mixed: a run with per-set results but none for `eval_set` is an error."""
    runs = {}
    for run_dir in sorted(p for p in (study_dir / "runs").glob("*") if p.is_dir()):
        per_set, single = run_dir / "eval" / eval_set / "eval.json", run_dir / "eval" / "eval.json"
        if per_set.is_file():
            runs[run_dir.name] = json.loads(per_set.read_text())["summary"]
        elif single.is_file():
            runs[run_dir.name] = json.loads(single.read_text())["summary"]
        elif any((run_dir / "eval").glob("*/eval.json")):
            raise SystemExit(
                f"{run_dir}: no eval/{eval_set}/eval.json (sets found: "
                f"{sorted(p.parent.name for p in (run_dir / 'eval').glob('*/eval.json'))})"
            )
    if not runs:
        raise SystemExit(f"no runs/*/eval[/{eval_set}]/eval.json under {study_dir}")
    return runs


def arm_of(run_id: str) -> str:
    return re.sub(r"-s\d+$", "", run_id)


def behaviour_keys(summaries: list[dict]) -> list[str]:
    keys = {k for s in summaries for k in s if k.startswith(("refusal_rate_unsafe[", "over_refusal_rate_safe["))}
    return sorted(keys) + ["kl_mean_token"]


def table(runs: dict[str, dict], per_run: bool) -> tuple[list[str], dict[str, dict[str, float]]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for run_id, summary in runs.items():
        groups[run_id if per_run else arm_of(run_id)].append(summary)
    keys = [k for k in AQI_KEYS if any(k in s for s in runs.values())] + behaviour_keys(list(runs.values()))
    values = {}
    for unit, summaries in groups.items():
        values[unit] = {k: float(np.mean([s[k] for s in summaries if s.get(k) is not None] or [np.nan])) for k in keys}
    return keys, values


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("study_dir", type=Path)
    ap.add_argument("--per-run", action="store_true", help="every run is a unit (default: arm means over seeds)")
    ap.add_argument(
        "--set",
        dest="eval_set",
        default="test",
        help="evaluation set of a study with evaluation_sets (default: test; the dev set is `dev`)",
    )
    a = ap.parse_args()
    keys, values = table(load_runs(a.study_dir, a.eval_set), a.per_run)
    units = sorted(values)
    aqi_keys = [k for k in keys if k in AQI_KEYS]
    outcomes = [k for k in keys if k not in AQI_KEYS]
    print(
        f"{len(units)} {'runs' if a.per_run else 'arms'} ({a.eval_set} set where the study has sets): "
        f"{', '.join(units)}\n"
    )
    print("| AQI variant | " + " | ".join(outcomes) + " |")
    print("|---|" + "---|" * len(outcomes))
    for k in aqi_keys:
        cells = []
        for outcome in outcomes:
            x = np.array([values[u][k] for u in units])
            y = np.array([values[u][outcome] for u in units])
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
                cells.append("n/a")
                continue
            rho, p = spearmanr(x[ok], y[ok])
            cells.append(f"{rho:+.2f} (p={p:.2g})")
        print(f"| {k} | " + " | ".join(cells) + " |")
    print("\nper unit:")
    print("| unit | " + " | ".join(keys) + " |")
    for u in units:
        print(f"| {u} | " + " | ".join(f"{values[u][k]:.4g}" for k in keys) + " |")


if __name__ == "__main__":
    main()
