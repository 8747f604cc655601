"""Reporting a study: records read from the run directories, then the report pipeline (report.py).

Needs no store: a copied or committed study directory reports as well as the live one.
"""

from __future__ import annotations

from pathlib import Path

from ..runio import DirLock
from .calibration import stored_calibration_rows, write_calibration
from .config import StudyConfig
from .plan import default_placement


def study_records(cfg: StudyConfig) -> tuple[list[dict], list[str]]:
    """One record per evaluated (arm, seed), read from the run directories (eval.json, summary.json),
    and the run ids not evaluated yet."""
    from .records import read_run

    records, missing = [], []
    for seed in cfg.seeds:
        for arm in cfg.arms:
            tc = cfg.arm_config(arm, seed) if arm.trained else None
            run_dir = Path(tc.run_dir) if tc else Path(cfg.study_dir) / "runs" / cfg.run_id(arm, seed)
            record = read_run(
                run_dir,
                arm=arm.name,
                seed=seed,
                method=arm.method,
                optimizer=arm.optimizer if tc else None,
                placement=(tc.method.placement or default_placement(arm.method))
                if tc
                else ("system" if arm.method == "prompt_only" else "none"),
                overrides=arm.overrides,
            )
            if record is None:
                missing.append(cfg.run_id(arm, seed))
            else:
                records.append(record)
    return records, missing


def report_study(cfg: StudyConfig) -> dict:
    """Build the report from the run directories alone (no store needed: works on a copied study)."""
    from .frontier_runs import frontier_sections
    from .report import build_report

    records, missing = study_records(cfg)
    notes = [f"Not evaluated yet, so left out: {', '.join(missing)}."] if missing else []
    rep = cfg.report
    with DirLock(cfg.study_dir, "study report"):  # no report while another process runs or reports this study
        return build_report(
            records,
            cfg.study_dir,
            n_resamples=rep.n_resamples,
            seed=rep.seed,
            alpha=rep.alpha,
            questions=cfg.questions,
            min_effect=rep.min_effect,
            arm_order=[a.name for a in cfg.arms],
            notes=notes,
            sections=_calibration_section(cfg) + frontier_sections(cfg),
        )


def _calibration_section(cfg: StudyConfig) -> list:
    """The sweep, the rule and each arm's choice (calibration.csv and its figure too), from the store or,
    in a copied study without one, from its calibration.csv."""
    rows = stored_calibration_rows(cfg.study_dir) if cfg.calibration.enabled else None
    if not rows:
        return []
    text = write_calibration(rows, Path(cfg.study_dir), cfg.calibration)
    return [lambda by_arm: text.rstrip("\n").splitlines()]
