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
from typing import Any, Literal

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


class Accuracy(Rate):
    """Multiple-choice accuracy (evaluation/capability.py) with its Wilson interval, plus what pairs two arms."""

    correct: str | None = None  # per question, in order: "1" right, "0" wrong
    questions_hash: str | None = None  # the questions scored; arms are compared only on equal hashes


class EvalSummary(Strict):
    aqi: Estimate  # the headline: discriminant AQI of the headline band (geometric in older eval.json files)
    # which statistic `aqi` is: "discriminant_band" = BandAqiStat(aqi_gamma) of eval/aqi_band_projections.npz;
    # "geometric" = AqiStat(aqi_gamma, aqi_pca_dim) of layer `aqi_layer` (eval.json before the discriminant AQI)
    aqi_statistic: Literal["discriminant_band", "geometric"] = "geometric"
    aqi_geometric: Estimate | None = None  # geometric AQI of the same band
    aqi_lexical: Estimate | None = None  # discriminant AQI at layer 0 (the words alone)
    aqi_geometric_lexical: Estimate | None = None
    # `aqi` under its explicit name: the prompt-representation AQI (pooled over the prompt's own tokens)
    aqi_prompt: Estimate | None = None
    # the behaviour AQI (evaluation/behaviour_aqi.py): prompt + the model's own judged completion
    aqi_completion: Estimate | None = None  # discriminant, completion tokens pooled, headline band
    aqi_geometric_completion: Estimate | None = None
    aqi_completion_lexical: Estimate | None = None  # layer 0: the completion's words alone (negative control)
    aqi_geometric_completion_lexical: Estimate | None = None
    aqi_last_prompt: Estimate | None = None  # the state the reply is decoded from
    aqi_geometric_last_prompt: Estimate | None = None
    aqi_learned: Estimate | None = None  # completion pooling, layers mixed by weights fitted on dev
    aqi_geometric_learned: Estimate | None = None
    aqi_gamma: float = 0.5  # the settings the evaluator computed AQI with (metrics.gamma,
    aqi_pca_dim: int | None = None  # embeddings.pca_dim, embeddings.layer)
    aqi_layer: int = -1
    n_prompts: int | None = None
    probe_auroc: Estimate | None = None
    behaviour_placement: str | None = None  # which generation variant the refusal rates are from
    refusal_rate_unsafe: Rate | None = None  # higher is better
    over_refusal_rate_safe: Rate | None = None  # lower is better
    refusal_judge: str | None = None  # behaviour.judge: strmatch or model:<id>
    # every generation variant (with / without the training instruction), by placement
    refusal_rate_unsafe_by_placement: dict[str, Rate] = {}
    over_refusal_rate_safe_by_placement: dict[str, Rate] = {}
    jailbreak_refusal_rate: Rate | None = None  # unsafe prompts in jailbreak templates, pooled (higher is better)
    perplexity: float | None = None  # on benign data (capability drift)
    perplexity_ratio: Estimate | None = None  # perplexity / base perplexity, paired interval
    kl_mean_token: float | None = None  # to the base, per token, on benign data
    collapsed: bool | None = None
    preference_reward_accuracy: Estimate | None = None  # held-out pairs, DPO implicit reward vs the base
    preference_reward_margin: Estimate | None = None
    preference_logp_accuracy: Estimate | None = None
    # capability (zero-shot multiple choice, `accuracy` = length-normalised log-likelihood), one field per set
    accuracy_mmlu: Accuracy | None = None
    accuracy_openbookqa: Accuracy | None = None
    accuracy_commonsenseqa: Accuracy | None = None


BEHAVIOUR_AQI_KEYS = (
    "aqi_completion",
    "aqi_geometric_completion",
    "aqi_completion_lexical",
    "aqi_geometric_completion_lexical",
    "aqi_last_prompt",
    "aqi_geometric_last_prompt",
    "aqi_learned",
    "aqi_geometric_learned",
)


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
    layers = result.get("aqi_layers")
    if layers:  # the headline and its variants (docs/aqi.md)

        def estimate(entry: dict) -> dict:
            return {"value": entry["aqi"], "low": entry.get("low"), "high": entry.get("high")}

        out.update(
            aqi=estimate(layers["discriminant"]),
            aqi_statistic="discriminant_band",
            aqi_geometric=estimate(layers["geometric"]),
            aqi_lexical=estimate(layers["lexical"]["discriminant"]),
            aqi_geometric_lexical=estimate(layers["lexical"]["geometric"]),
            aqi_prompt=estimate(layers["discriminant"]),
        )
    summary = result.get("summary") or {}
    for name in BEHAVIOUR_AQI_KEYS:  # absent from eval.json files written before the behaviour AQI
        if summary.get(name) is not None:
            out[name] = {"value": summary[name], "low": summary.get(f"{name}_low"), "high": summary.get(f"{name}_high")}
    if "probe_auroc" in overall:
        auroc = overall.get("probe_auroc_ci") or {}
        out["probe_auroc"] = {"value": overall["probe_auroc"], "low": auroc.get("low"), "high": auroc.get("high")}
    behaviour = result.get("behaviour") or {}
    if behaviour:
        b_settings = settings.get("behaviour") or {}
        shown = b_settings.get("shown_placement", "none")
        placement = shown if shown in behaviour else next(iter(behaviour))
        out["behaviour_placement"] = placement
        out["refusal_judge"] = b_settings.get("judge", "strmatch")
        for key in ("refusal_rate_unsafe", "over_refusal_rate_safe"):
            out[key] = _rate(behaviour[placement][key])
            out[f"{key}_by_placement"] = {p: _rate(r[key]) for p, r in behaviour.items() if r[key]["rate"] is not None}
    jailbreak = (result.get("jailbreak") or {}).get("overall")
    if jailbreak and jailbreak["rate"] is not None:
        out["jailbreak_refusal_rate"] = _rate(jailbreak)
    drift = result.get("drift") or {}
    for key in ("perplexity", "kl_mean_token", "collapsed"):
        out[key] = drift.get(key)
    if drift.get("perplexity_ratio") is not None:
        out["perplexity_ratio"] = _estimate(drift["perplexity_ratio"], drift.get("perplexity_ratio_ci"))
    pref = result.get("preference") or {}
    for key in ("reward_accuracy", "reward_margin", "logp_accuracy"):
        if pref.get(key) is not None:
            out[f"preference_{key}"] = _estimate(pref[key], pref.get(f"{key}_ci"))
    for name, r in (result.get("capability") or {}).items():
        out[f"accuracy_{name}"] = {
            **_rate(r["accuracy"]),
            "correct": r.get("correct"),
            "questions_hash": r.get("questions_hash"),
        }
    return EvalSummary.model_validate(out)


def _rate(r: dict[str, Any]) -> dict[str, Any]:
    # the Wilson interval: the bootstrap's collapses to [0, 0] at 0% (and [1, 1] at 100%), which a table reads
    # as certainty; eval.json files from before the Wilson keys keep their bootstrap interval
    low, high = (r["wilson_low"], r["wilson_high"]) if "wilson_low" in r else (r.get("low"), r.get("high"))
    return {"rate": r["rate"], "low": low, "high": high, "n": r["total"]}


def _estimate(value: float, ci: dict[str, Any] | None) -> dict[str, Any]:
    return {"value": value, "low": (ci or {}).get("low"), "high": (ci or {}).get("high")}


def read_eval_summary(path: str | Path) -> EvalSummary:
    """`summarize_eval` of an eval.json file; a malformed file names itself in the error."""
    path = Path(path)
    try:
        return summarize_eval(json.loads(path.read_text()))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable evaluation result ({type(e).__name__}: {e})") from None
