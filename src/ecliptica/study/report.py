"""Study report: a pipeline of small steps, records -> contrasts -> table -> questions -> text.

``build_report(records, out_dir, ...)`` takes one record per (arm, seed) (``records.StudyRecord``;
``eval`` is the evaluator's ``EvalSummary``) and writes ``results.md``, ``results.csv``,
``results.json`` and ``figures/`` (PNG + PDF). The steps live in ``records.py`` (grouping,
embeddings), ``contrasts.py`` (paired tests), ``table.py`` (one row per arm), ``questions.py``
(the declared research questions, Holm-corrected) and ``render.py`` (Markdown, CSV, JSON).
docs/study.md explains how the numbers are read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..runio import atomic_write_text
from .capability import capability_section
from .contrasts import StudyContext, aqi_resamples
from .design import MinEffect, Question, default_questions
from .questions import answer_questions
from .records import BASELINE, group_by_arm, load_embeddings, read_training_curves
from .render import Section, jsonable, optional_sections, render_markdown, write_csv
from .table import build_table

__all__ = ["build_report", "make_figures", "CURVE_METRICS"]

CURVE_METRICS = ("loss", "rewards/margins", "kl")


def build_report(
    records: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    questions: Sequence[Question] | None = None,
    min_effect: MinEffect | None = None,
    arm_order: Sequence[str] = (),
    sections: Sequence[Section] = (),
    notes: Sequence[str] = (),
    figures: bool = True,
) -> dict[str, Any]:
    """Write results.md/.csv/.json and figures/ for the study; return paths, rows and answers.

    ``questions`` default to Q1–Q4 (``design.default_questions``); ``min_effect`` to
    ``MinEffect()``. ``sections`` render optional parts from the records (``render.SECTIONS``);
    ``notes`` are added to the report's notes. ``figures=False`` skips the plots (the slow part) for quick re-reads.
    """
    if not records:
        raise ValueError("no records to report on")
    questions = default_questions() if questions is None else list(questions)
    min_effect = min_effect or MinEffect()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    by_arm = group_by_arm(records, arm_order)
    emb = load_embeddings(by_arm)
    ctx = StudyContext(by_arm, aqi_resamples(emb, by_arm, n_resamples, seed) if emb else None, n_resamples, seed, alpha)
    rows = build_table(ctx)
    answers = answer_questions(ctx, questions, rows, min_effect)
    notes = [*notes, *study_notes(ctx, records)]
    settings = report_settings(ctx, emb, min_effect)

    figure_paths = make_figures(ctx, rows, answers, out / "figures") if figures else {}
    paths = {"results_md": out / "results.md", "results_csv": out / "results.csv", "results_json": out / "results.json"}
    atomic_write_text(
        paths["results_md"],
        render_markdown(rows, answers, settings, notes, optional_sections(by_arm, sections) + capability_section(rows)),
    )
    write_csv(rows, paths["results_csv"])
    payload = {"settings": settings, "rows": rows, "questions": answers, "notes": notes, "figures": figure_paths}
    atomic_write_text(paths["results_json"], json.dumps(jsonable(payload), indent=2, ensure_ascii=False))
    return {
        **{k: str(v) for k, v in paths.items()},
        "figures": figure_paths,
        "rows": rows,
        "questions": answers,
        "notes": notes,
    }


def study_notes(ctx: StudyContext, records: Sequence[Mapping[str, Any]]) -> list[str]:
    notes = []
    if ctx.aqi is None:
        notes.append(
            "No embeddings in the records: AQI contrasts are t-intervals over seeds of the recorded AQI "
            "(prompt sampling not included) and are not answerable with one seed."
        )
    shared = sorted({(r.get("train") or {}).get("device_shared_by") or 1 for r in records} - {1})
    if shared:
        notes.append(
            f"Runs trained while {' or '.join(map(str, shared))} study workers shared each device: train "
            "minutes and tokens/s are wall-clock under that sharing (comparable between arms of this study, "
            "not standalone speeds), and device-hours are wall time divided by the number of workers sharing it."
        )
    if BASELINE not in ctx.by_arm:
        notes.append("No baseline arm: ΔAQI and efficiency are not answerable.")
    return notes


def report_settings(ctx: StudyContext, emb, min_effect: MinEffect) -> dict[str, Any]:
    aqi = sorted(
        {
            (r["eval"].aqi_gamma, r["eval"].aqi_pca_dim, r["eval"].aqi_layer)
            for runs in ctx.by_arm.values()
            for r in runs.values()
        },
        key=str,
    )
    return {
        "n_resamples": ctx.n_resamples,
        "seed": ctx.seed,
        "alpha": ctx.alpha,
        "n_prompts": int(emb.labels.size) if emb is not None else _recorded_prompts(ctx),
        "aqi": [{"gamma": g, "pca_dim": d, "layer": layer} for g, d, layer in aqi],
        "min_effect": min_effect.model_dump(),
        "min_effect_text": ", ".join(f"{k} ±{v:g}" for k, v in min_effect.model_dump().items()),
        "arms": ctx.arms,
        "seeds": {a: list(r) for a, r in ctx.by_arm.items()},
    }


def _recorded_prompts(ctx: StudyContext) -> int | None:
    counts = {r["eval"].n_prompts for runs in ctx.by_arm.values() for r in runs.values()} - {None}
    return counts.pop() if len(counts) == 1 else None


def grit_paired_methods(rows) -> list[str]:
    """Registered methods (ecliptica.losses.registry, in its order) that the study ran both without and with GRIT
    as arms named `m` and `m_grit`: a new method gets its pair in the figure with no edit here."""
    from ecliptica.losses import registry

    arms = {r["arm"] for r in rows}
    return [m for m in registry.method_names() if m in arms and f"{m}_grit" in arms]


def make_figures(ctx: StudyContext, rows, answers, fig_dir: Path) -> dict[str, dict[str, str]]:
    from ecliptica.study import figures as F

    grit = [f for f in answers.get("Q2", {}).get("findings", []) if f.get("metric") == "AQI"]
    best, base = _cluster_pair(ctx, rows)
    return {
        "fig1_aqi_by_method": F.aqi_by_arm(rows, fig_dir / "fig1_aqi_by_method"),
        "fig2_delta_aqi_vs_baseline": F.delta_aqi(rows, fig_dir / "fig2_delta_aqi_vs_baseline"),
        "fig3_grit_effect": F.grit_effect(grit, fig_dir / "fig3_grit_effect"),
        "fig4_method_pairs": F.method_pairs(rows, grit_paired_methods(rows), fig_dir / "fig4_method_pairs"),
        "fig5_efficiency": F.efficiency(rows, fig_dir / "fig5_efficiency"),
        "fig6_clusters_3d": F.clusters_3d(
            best, base, ctx.aqi.emb.labels if ctx.aqi else None, fig_dir / "fig6_clusters_3d"
        ),
        "training_curves": F.training_curves(
            read_training_curves(ctx.by_arm), CURVE_METRICS, fig_dir / "training_curves"
        ),
    }


def _cluster_pair(ctx: StudyContext, rows):
    """(name, X) of the best non-baseline arm by AQI and of the baseline (their first seed with embeddings)."""
    if ctx.aqi is None:
        return None, None

    def first_embedded(arm):
        seed = next((s for s in ctx.by_arm.get(arm, {}) if ctx.aqi.has((arm, s))), None)
        return None if seed is None else (f"{arm} (seed {seed})", ctx.aqi.emb.X[(arm, seed)])

    ranked = sorted((r for r in rows if r["arm"] != BASELINE and r["aqi"] is not None), key=lambda r: -r["aqi"])
    best = next((e for r in ranked if (e := first_embedded(r["arm"])) is not None), None)
    return best, first_embedded(BASELINE)
