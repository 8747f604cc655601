"""The matched-drift and convergence part of the report: frontier.json, frontier.csv, the figures, and Markdown.

Q2 (the question named `convergence.question`, "Q2" by default) gets the convergence tests in its Holm family,
beside its contrasts at matched drift.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from .convergence import arm_summary, convergence_tests
from .frontier import Frontier, frontier_findings
from .frontier_runs import read_frontier

CONVERGENCE_QUESTION = "Q2"
COLUMNS = (
    "question",
    "comparison",
    "outcome",
    "kl_level",
    "lr",
    "estimate",
    "low",
    "high",
    "p_value",
    "p_holm",
    "significant",
    "interpolation_error",
    "draws_with_seed_out_of_range",
    "n_seeds",
    "reason",
    "method",
)


def write_frontier_report(cfg, out_dir: Path) -> list[str]:
    s = cfg.frontier
    points, conv, missing = read_frontier(cfg)
    lines = ["## Matched drift (frontier)", ""]
    lines.append(
        f"Each trained arm at lrs {', '.join(f'{lr:g}' for lr in s.lrs)} (and its own), evaluated at steps "
        f"{', '.join(map(str, sorted(s.steps)))}; outcomes compared at benign token KL "
        f"{', '.join(f'{k:g}' for k in s.kl_levels)} by linear interpolation in log KL along each seed's frontier "
        "(no extrapolation); `interpolation_error` = |log-KL rule − linear-KL rule|; CIs resample seeds, prompts "
        "and drift examples; Holm within each question (Q2 with its convergence tests)."
    )
    if missing:
        lines += ["", f"Checkpoints not evaluated yet, so left out: {', '.join(missing)}."]
    extra = {}
    if cfg.convergence.enabled and conv:
        extra[CONVERGENCE_QUESTION] = convergence_tests(conv, cfg.convergence, cfg.report.alpha)
    findings: list[dict[str, Any]] = []
    if points:
        fr = Frontier(points, n_resamples=s.n_resamples, seed=s.seed)
        present = [o for o in s.outcome_names() if o in fr.outcome_names()]
        absent = [o for o in s.outcome_names() if o not in present]
        if absent:
            lines += ["", f"Outcomes in no evaluation, so not compared: {', '.join(absent)}."]
        findings = frontier_findings(fr, cfg.questions, present, s.kl_levels, alpha=cfg.report.alpha, extra=extra)
        from .frontier_figures import convergence_figure, frontier_figures

        frontier_figures(fr, present, s.kl_levels, out_dir / "figures")
        if conv:
            convergence_figure(conv, cfg.convergence, out_dir / "figures")
    lines += [
        "",
        "| question | comparison | outcome | KL | estimate [95% CI] | p (Holm) | interp. error |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in findings:
        where = f"{f['kl_level']:g}" if "kl_level" in f else f"lr {f.get('lr', ''):g}"
        if not f.get("answerable"):
            lines.append(f"| {f['question']} | {f['comparison']} | {f['outcome']} | {where} | {f['reason']} | | |")
            continue
        mark = " *" if f.get("significant") else ""
        err = f"{f['interpolation_error']:.3g}" if "interpolation_error" in f else ""
        lines.append(
            f"| {f['question']} | {f['comparison']} | {f['outcome']} | {where} | {f['estimate']:+.3g} "
            f"[{f['low']:+.3g}, {f['high']:+.3g}] | {f.get('p_holm', float('nan')):.3g}{mark} | {err} |"
        )
    lines += ["", "\\* significant after Holm within its question."]
    conv_rows = arm_summary(conv) if conv else []
    (out_dir / "frontier.json").write_text(
        json.dumps({"findings": findings, "convergence": conv_rows, "missing": missing}, indent=1, default=str)
    )
    with open(out_dir / "frontier.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(findings)
    return lines
