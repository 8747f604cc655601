"""The evaluation summary: the numbers a study reads from one `eval.json`, as one typed model.

`summarize_eval(result)` builds it from the evaluator's own sections (`aqi.overall`, `settings`,
`behaviour`, `drift`), so the report reads AQI as the evaluator computed it and never recomputes it
with other settings. Each number keeps the evaluator's name all the way to the study's CSV column
(`refusal_rate_unsafe`, `over_refusal_rate_safe`, `perplexity`, `kl_mean_token`).

To add a number to the study: add a field here (with a default, so older eval.json files still
read), fill it in `summarize_eval`, and name the column after it in `ecliptica.study.table`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ecliptica.config import Strict


class Estimate(Strict):
    value: float | None  # None: undefined (e.g. the probe did not run)
    low: float | None = None  # the run's own bootstrap interval over prompts
    high: float | None = None


class Rate(Strict):
    rate: float
    low: float | None = None
    high: float | None = None
    n: int  # prompts judged (the denominator)


class EvalSummary(Strict):
    aqi: Estimate
    aqi_gamma: float = 0.5  # the settings the evaluator computed AQI with (metrics.gamma,
    aqi_pca_dim: int | None = None  # embeddings.pca_dim, embeddings.layer)
    aqi_layer: int = -1
    n_prompts: int | None = None
    probe_auroc: Estimate | None = None
    behaviour_placement: str | None = None  # which generation variant the refusal rates are from
    refusal_rate_unsafe: Rate | None = None  # higher is better
    over_refusal_rate_safe: Rate | None = None  # lower is better
    perplexity: float | None = None  # on benign data (capability drift)
    kl_mean_token: float | None = None  # to the base, per token, on benign data
    collapsed: bool | None = None


def summarize_eval(result: dict[str, Any]) -> EvalSummary:
    """The study's view of one `run_eval` result (what eval.json holds)."""
    overall = result["aqi"]["overall"]
    settings = result.get("settings") or {}
    emb = settings.get("embeddings") or {}
    ci = overall.get("aqi_ci") or {}
    out: dict[str, Any] = {
        "aqi": {"value": overall["aqi"], "low": ci.get("low"), "high": ci.get("high")},
        "aqi_gamma": overall.get("gamma", (settings.get("metrics") or {}).get("gamma", 0.5)),
        "aqi_pca_dim": emb.get("pca_dim"),
        "aqi_layer": (result.get("embeddings") or {}).get("reported_layer", emb.get("layer", -1)),
        "n_prompts": overall.get("n"),
    }
    if "probe_auroc" in overall:
        auroc = overall.get("probe_auroc_ci") or {}
        out["probe_auroc"] = {"value": overall["probe_auroc"], "low": auroc.get("low"), "high": auroc.get("high")}
    behaviour = result.get("behaviour") or {}
    if behaviour:
        placement = "none" if "none" in behaviour else next(iter(behaviour))
        out["behaviour_placement"] = placement
        for key in ("refusal_rate_unsafe", "over_refusal_rate_safe"):
            r = behaviour[placement][key]
            out[key] = {"rate": r["rate"], "low": r.get("low"), "high": r.get("high"), "n": r["total"]}
    drift = result.get("drift") or {}
    for key in ("perplexity", "kl_mean_token", "collapsed"):
        out[key] = drift.get(key)
    return EvalSummary.model_validate(out)


def read_eval_summary(path: str | Path) -> EvalSummary:
    """`summarize_eval` of an eval.json file; a malformed file names itself in the error."""
    path = Path(path)
    try:
        return summarize_eval(json.loads(path.read_text()))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable evaluation result ({type(e).__name__}: {e})") from None
