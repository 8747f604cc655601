"""The research questions, answered from the study's declared contrasts (``StudyConfig.questions``).

Each question's tests are one family: p-values are Holm-adjusted within it and significance is
read from the adjusted p. A difference is claimed only when the adjusted p < alpha; "no difference"
only when the whole CI lies within ±the metric's minimum effect of interest (equivalence);
anything else is inconclusive. Wording is produced here, after the correction, from the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ecliptica.evaluation.stats import holm_adjust

from .contrasts import StudyContext, contrast, decide
from .design import Contrast, MinEffect, Overhead, Question
from .records import BASELINE

RATE_WORDING = {"refusal_rate_unsafe": "refuses more unsafe prompts", "over_refusal_rate_safe": "over-refuses more"}


# --------------------------------------------------------------------------- findings (numbers only)


def contrast_findings(ctx: StudyContext, c: Contrast) -> list[dict[str, Any]]:
    pos = next(a for a, w in c.terms.items() if w > 0)
    neg = next(a for a, w in c.terms.items() if w < 0)
    findings = []
    for key in c.metrics:
        if key == "aqi":
            higher, lower = c.higher or f"{pos} higher", c.lower or f"{neg} higher"
        elif c.is_simple_pair:
            higher, lower = f"{pos} {RATE_WORDING[key]}", f"{neg} {RATE_WORDING[key]}"
        else:
            higher, lower = "positive", "negative"
        result = contrast(ctx, key, c.terms, c.label)
        findings.append({**result, "kind": "contrast", "metric_key": key, "higher": higher, "lower": lower})
    return findings


def placement_pairs(ctx: StudyContext) -> list[tuple[str, str]]:
    """Arm pairs that differ only by instruction placement (same method, optimizer and overrides).

    Ordered (more instruction, less): an instructed arm before ``none``; ``prepend`` before ``system``.
    """
    rank = {"prepend": 2, "system": 1, "none": 0}
    info = {a: next(iter(runs.values())) for a, runs in ctx.by_arm.items() if a != BASELINE}
    pairs = []
    arms = list(info)
    for i, a in enumerate(arms):
        for b in arms[i + 1 :]:
            ra, rb = info[a], info[b]
            same = (
                ra["method"] == rb["method"]
                and ra.get("optimizer") == rb.get("optimizer")
                and (ra.get("overrides") or {}) == (rb.get("overrides") or {})
            )
            if same and ra.get("placement") != rb.get("placement"):
                hi, lo = (a, b) if rank.get(ra.get("placement"), 0) >= rank.get(rb.get("placement"), 0) else (b, a)
                pairs.append((hi, lo))
    return pairs


def efficiency_finding(row: Mapping[str, Any]) -> dict[str, Any]:
    base = {"kind": "efficiency", "comparison": row["arm"], "metric": "ΔAQI per GPU-hour", "metric_key": "aqi"}
    if row["efficiency"] is None:
        reason = "no ΔAQI vs baseline" if row["delta_aqi"] is None else "no training time recorded"
        return {**base, "answerable": False, "reason": f"not answerable: {reason}"}
    return {
        **base,
        "answerable": True,
        "estimate": row["efficiency"],
        "low": row["efficiency_low"],
        "high": row["efficiency_high"],
        "unit": row["efficiency_unit"],
        "p_value": row["delta_aqi_p"],
        "delta_aqi": row["delta_aqi"],
        "delta_aqi_low": row["delta_aqi_low"],
        "delta_aqi_high": row["delta_aqi_high"],
        "compute_hours": row["compute_hours"],
        "compute_device": row["compute_device"],
    }


def overhead_finding(ctx: StudyContext, rows: Mapping[str, Mapping[str, Any]], o: Overhead) -> dict[str, Any]:
    """Time and VRAM of `treated` over `base`, with the AQI contrast treated − base it buys."""
    head = {
        "kind": "overhead",
        "comparison": f"{o.treated} vs {o.base}",
        "metric": f"{o.treated} time overhead",
        "base": o.base,
        "treated": o.treated,
    }
    missing = [a for a in (o.base, o.treated) if a not in rows]
    if missing:
        return {**head, "answerable": False, "reason": f"not answerable: arm {', '.join(missing)} missing"}
    plain, treated = rows[o.base], rows[o.treated]
    if not plain["train_minutes"] or treated["train_minutes"] is None:
        return {**head, "answerable": False, "reason": "not answerable: training time missing"}
    vram = (
        treated["peak_vram_gib"] - plain["peak_vram_gib"]
        if treated["peak_vram_gib"] is not None and plain["peak_vram_gib"] is not None
        else None
    )
    effect = contrast(ctx, "aqi", {o.treated: 1.0, o.base: -1.0}, f"{o.treated} − {o.base}")
    out = {
        **head,
        "answerable": True,
        "time_ratio": treated["train_minutes"] / plain["train_minutes"],
        "extra_minutes": treated["train_minutes"] - plain["train_minutes"],
        "extra_compute_hours": treated["compute_hours"] - plain["compute_hours"],
        "compute_device": plain["compute_device"],
        "extra_peak_vram_gib": vram,
        "effect": effect,
    }
    if effect.get("answerable"):
        out["p_value"] = effect["p_value"]  # the AQI test is this finding's member of the family
    return out


# --------------------------------------------------------------------------- correction and decisions


def correct(findings: list[dict[str, Any]], alpha: float, min_effect: MinEffect) -> None:
    """Holm within this family; significance and the decision from the adjusted p (in place)."""
    tested = [
        f for f in findings if f.get("answerable") and f.get("p_value") is not None and math.isfinite(f["p_value"])
    ]
    for f in findings:  # answerable but without a p-value (undefined statistic): no claim either way
        if f.get("answerable") and f not in tested:
            f.update(p_holm=None, significant=False, significant_unadjusted=False, family_size=len(tested))
            if f["kind"] == "contrast":
                f.update(margin=getattr(min_effect, f["metric_key"]), decision="inconclusive")
    for f, adjusted in zip(tested, holm_adjust([f["p_value"] for f in tested])):
        f["p_holm"] = adjusted
        f["significant_unadjusted"] = bool(f.get("significant", f["p_value"] < alpha))
        f["significant"] = adjusted < alpha
        f["family_size"] = len(tested)
        if f["kind"] == "contrast":
            f["margin"] = getattr(min_effect, f["metric_key"])
            f["decision"] = decide(f["low"], f["high"], adjusted, alpha, f["margin"])


# --------------------------------------------------------------------------- wording


def num(x: float | None, digits: int = 3, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def p_text(p: float | None) -> str:
    if p is None or not math.isfinite(p):
        return "n/a"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def describe_contrast(f: Mapping[str, Any], alpha: float) -> str:
    """Estimate, CI, raw and Holm p, and the decision: different, equivalent or inconclusive."""
    head = f"{f['metric']}, {f['comparison']}"
    if not f.get("answerable"):
        return f"{head}: {f['reason']}"
    seeds = f"{f['n_seeds']} seed{'s' if f['n_seeds'] > 1 else ''}"
    margin = f["margin"]
    text = (
        f"{head} = {num(f['estimate'], signed=True)} ({1 - alpha:.0%} CI {num(f['low'], signed=True)} to "
        f"{num(f['high'], signed=True)}, p = {p_text(f['p_value'])}, Holm-adjusted p = {p_text(f['p_holm'])} "
        f"over {f['family_size']} tests, {seeds}): "
    )
    inside = f"the whole CI lies within ±{margin:g}"
    if f["decision"] == "different":
        side = f["higher"] if f["estimate"] > 0 else f["lower"]
        text += f"significant at α={alpha:g} after Holm correction; {side}."
        if -margin < f["low"] and f["high"] < margin:
            text += f" But {inside}: smaller than the minimum effect of interest."
    elif f["decision"] == "equivalent":
        text += (
            f"not significant at α={alpha:g} after Holm correction, and {inside} (the minimum effect of "
            "interest): no difference that matters (equivalent)."
        )
    else:
        text += (
            f"not significant at α={alpha:g} after Holm correction, and the CI reaches beyond ±{margin:g}: "
            "inconclusive."
        )
        if f["significant_unadjusted"]:
            text += " (The uncorrected CI excludes 0.)"
    return text + _seed_sign_note(f)


def _seed_sign_note(f: Mapping[str, Any]) -> str:
    if not f.get("seeds_disagree"):
        return ""
    values = ", ".join(f"seed {s}: {v:+.2g}" for s, v in f["per_seed"].items())
    return f" Seeds disagree in sign ({values})."


def describe_efficiency(f: Mapping[str, Any], alpha: float) -> str:
    if not f.get("answerable"):
        return f"{f['comparison']}: ΔAQI per GPU-hour {f['reason']}."
    cost = f"ΔAQI {num(f['delta_aqi'], signed=True)} over {num(f['compute_hours'], 3)} {f['compute_device']}-h"
    eff = f"{num(f['estimate'], signed=True)} (CI {num(f['low'], signed=True)} to {num(f['high'], signed=True)})"
    if f["compute_device"] == "CPU":
        text = f"{f['comparison']}: ΔAQI per GPU-hour n/a (CPU); per CPU-hour {eff} ({cost})."
    else:
        text = f"{f['comparison']}: ΔAQI per GPU-hour {eff} ({cost})."
    if not f["significant"]:
        text += (
            f" ΔAQI itself is not significant at α={alpha:g} (Holm-adjusted p = {p_text(f['p_holm'])}), "
            "so neither is this rate."
        )
    return text


def describe_overhead(f: Mapping[str, Any], alpha: float) -> str:
    head = f"{f['treated']} over {f['base']}"
    if not f.get("answerable"):
        return f"Overhead of {head}: {f['reason']}."
    vram = f"{num(f['extra_peak_vram_gib'], 2, True)} GiB" if f["extra_peak_vram_gib"] is not None else "n/a"
    text = (
        f"{head}: training time ×{f['time_ratio']:.2f} ({num(f['extra_minutes'], 1, True)} min per run, "
        f"{num(f['extra_compute_hours'], 3, True)} {f['compute_device']}-h), peak VRAM {vram}. "
    )
    return text + _cost_verdict(f, alpha)


def _cost_verdict(f: Mapping[str, Any], alpha: float) -> str:
    effect = f["effect"]
    if not effect.get("answerable"):
        return "Its AQI effect is not answerable, so the cost cannot be weighed."
    est = num(effect["estimate"], signed=True)
    adjusted = f"Holm-adjusted p = {p_text(f['p_holm'])}"
    if not f["significant"]:
        return (
            f"Its AQI effect ({est}, {adjusted}) is not significant at α={alpha:g}: the extra compute buys no "
            "AQI gain distinguishable from zero."
        )
    if effect["estimate"] < 0:
        return f"Its AQI effect ({est}, {adjusted}) is significantly negative: the extra compute lowers AQI."
    if f["extra_compute_hours"] > 0:
        per_hour = num(effect["estimate"] / f["extra_compute_hours"], 3, True)
        return (
            f"Its AQI gain ({est}, {adjusted}) is significant at α={alpha:g}: {per_hour} "
            "AQI per extra compute-hour; whether that is worth it depends on the budget."
        )
    return f"Its AQI gain ({est}, {adjusted}) is significant at α={alpha:g} and it costs no extra time."


DESCRIBE = {"contrast": describe_contrast, "efficiency": describe_efficiency, "overhead": describe_overhead}


# --------------------------------------------------------------------------- questions


def seed_notes(ctx: StudyContext) -> list[str]:
    if ctx.max_seeds == 1:
        return ["One seed per arm: seed-to-seed variance is not captured; intervals reflect prompt sampling only."]
    if ctx.aqi is None:
        return [
            f"Up to {ctx.max_seeds} seeds per arm: estimates are means of per-seed differences; AQI intervals "
            "are t-intervals over seeds (prompt sampling not included), refusal intervals resample seeds, then "
            "binomial draws."
        ]
    return [
        f"Up to {ctx.max_seeds} seeds per arm: estimates are means of per-seed differences; intervals "
        "resample seeds, then prompts (with few seeds the seed stage understates seed variance)."
    ]


def answer(ctx: StudyContext, q: Question, rows: Sequence[Mapping[str, Any]], min_effect: MinEffect) -> dict:
    findings: list[dict[str, Any]] = []
    notes = list(q.notes)
    for c in q.contrasts:
        if c.only_if_present and any(a not in ctx.by_arm for a in c.terms):
            continue
        findings += contrast_findings(ctx, c)
    if q.placement_pairs:
        pairs = placement_pairs(ctx)
        for hi, lo in pairs:
            findings += contrast_findings(ctx, Contrast(terms={hi: 1.0, lo: -1.0}))
        notes.append(
            "Instruction factor alone: "
            + ", ".join(f"{hi} ({_placement(ctx, hi)}) vs {lo} ({_placement(ctx, lo)})" for hi, lo in pairs)
            + "."
            if pairs
            else "No arms differ only by instruction placement (e.g. dpo vs dpo_sys, cita vs cita_noinstr): "
            "the instruction factor alone is not answerable."
        )
    by_arm = {r["arm"]: r for r in rows}
    if q.efficiency:
        findings += [efficiency_finding(r) for r in rows if r["arm"] != BASELINE]
    findings += [overhead_finding(ctx, by_arm, o) for o in q.overheads]
    correct(findings, ctx.alpha, min_effect)
    for f in findings:
        f["text"] = DESCRIBE[f["kind"]](f, ctx.alpha)
    tested = sum("p_holm" in f for f in findings)
    notes.append(
        f"{tested} tests in this family; p-values are Holm-adjusted within it (family-wise α = {ctx.alpha:g})."
    )
    answerable = [f.get("answerable", True) for f in findings]
    status = (
        "answered" if answerable and all(answerable) else "partly answerable" if any(answerable) else "not answerable"
    )
    return {"question": q.title, "status": status, "findings": findings, "notes": notes + seed_notes(ctx)}


def _placement(ctx: StudyContext, arm: str) -> str:
    return str(next(iter(ctx.by_arm[arm].values())).get("placement"))


def answer_questions(
    ctx: StudyContext, questions: Sequence[Question], rows: Sequence[Mapping[str, Any]], min_effect: MinEffect
) -> dict[str, dict[str, Any]]:
    return {q.id: answer(ctx, q, rows, min_effect) for q in questions}
