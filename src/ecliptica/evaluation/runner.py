"""`run_eval(cfg)`: one model (base + optional adapter) -> eval.json, per_axiom.csv, generations.jsonl, figures/.

A study passes its already-loaded `ModelHandle` so seven arms share one base: each call attaches
that arm's adapter (or, with `adapter: null`, evaluates the base with the adapter disabled).
"""
from __future__ import annotations

import csv
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ecliptica.data import PromptExample
from ecliptica.evaluation.behaviour import GenerationSettings, handle_generator, handle_renderer, run_behaviour
from ecliptica.evaluation.config import EvalConfig
from ecliptica.evaluation.drift import DriftSettings, load_benign_pairs, run_drift
from ecliptica.evaluation.embeddings import EmbedSettings, embed_prompts
from ecliptica.evaluation.model_handle import ModelHandle
from ecliptica.evaluation.prompts import balanced_subset, load_eval_prompts, prompts_hash
from ecliptica.evaluation.refusal import RefusalJudge
from ecliptica.evaluation.scoring import evaluate_embeddings, json_ready, layer_curve
from ecliptica.models import ModelConfig, cache_dir as default_cache_root
from ecliptica.runio import DirLock, atomic_write_text

log = logging.getLogger(__name__)


def embed_settings(cfg: EvalConfig) -> EmbedSettings:
    e = cfg.embeddings
    return EmbedSettings(pooling=e.pooling, layer=e.layer, layer_sweep=e.layer_sweep, placement=e.placement,
                         instruction=e.instruction, max_length=e.max_length, batch_size=e.batch_size,
                         progress=cfg.progress)


def prompts_from_config(cfg: EvalConfig) -> list[PromptExample]:
    d = cfg.data
    return load_eval_prompts(d.path, d.format, limit=d.limit, per_group=d.per_group, seed=d.seed,
                             benign_path=d.benign_path, benign_format=d.benign_format, on_bad_row=d.on_bad_row)


def _data_summary(cfg: EvalConfig, prompts: Sequence[PromptExample]) -> dict[str, Any]:
    groups = Counter(f"{p.axiom}/{p.label}" for p in prompts)
    return {"path": cfg.data.path, "format": cfg.data.format, "benign_path": cfg.data.benign_path,
            "n_prompts": len(prompts), "labels": dict(Counter(p.label for p in prompts)),
            "groups": dict(sorted(groups.items())), "data_hash": prompts_hash(prompts)}


def run_eval(cfg: EvalConfig, *, handle: ModelHandle | None = None, prompts: Sequence[PromptExample] | None = None,
             judge: RefusalJudge | None = None) -> dict[str, Any]:
    """Evaluate one model and write every artefact under cfg.out_dir; returns what eval.json holds.

    `handle`: an already-loaded base (its adapter is switched to cfg.adapter); `prompts`: reuse a
    loaded prompt set; `judge`: a refusal judge instead of the string matcher. out_dir is locked
    (one evaluation writes it at a time) before the model loads.
    """
    with DirLock(cfg.out_dir, "eval"):
        return _run_eval(cfg, handle=handle, prompts=prompts, judge=judge)


def _run_eval(cfg: EvalConfig, *, handle: ModelHandle | None, prompts: Sequence[PromptExample] | None,
              judge: RefusalJudge | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(cfg.out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    if handle is None:
        handle = ModelHandle.load(ModelConfig(**cfg.model.model_dump()))
    handle.set_adapter(cfg.adapter)
    prompts = list(prompts) if prompts is not None else prompts_from_config(cfg)
    labels, axioms = [p.label for p in prompts], [p.axiom for p in prompts]
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_root() / "embeddings"
    m = cfg.metrics

    t = time.perf_counter()
    with handle.merged(cfg.merge_adapter):
        emb = embed_prompts(handle, prompts, embed_settings(cfg), cache)
        timings["embeddings_s"] = time.perf_counter() - t
        behaviour = _behaviour(cfg, handle, prompts, judge, out, timings)
    X = emb.at(cfg.embeddings.layer)

    t = time.perf_counter()
    aqi = evaluate_embeddings(X, labels, axioms, gamma=m.gamma, pca_dim=cfg.embeddings.pca_dim,
                              n_resamples=m.n_resamples, seed=m.seed, alpha=m.alpha, legacy=m.legacy)
    curve = (layer_curve(emb.vectors, emb.layers, labels, gamma=m.gamma, pca_dim=cfg.embeddings.pca_dim,
                         n_resamples=m.n_resamples, seed=m.seed, alpha=m.alpha)
             if cfg.embeddings.layer_sweep else None)
    timings["metrics_s"] = time.perf_counter() - t

    drift = None
    if cfg.drift.enabled:
        t = time.perf_counter()
        drift = run_drift(handle, load_benign_pairs(cfg.drift.path, cfg.drift.format, cfg.drift.category,
                                                    cfg.drift.limit), _drift_settings(cfg))
        timings["drift_s"] = time.perf_counter() - t

    figures = _figures(cfg, X, labels, curve, out / "figures")
    _write_per_axiom_csv(out / "per_axiom.csv", aqi, behaviour)
    timings["total_s"] = time.perf_counter() - t_start
    result = {
        "summary": _summary(aqi, behaviour, drift),
        "settings": cfg.model_dump(mode="json"),
        "model": handle.identity(),
        "data": _data_summary(cfg, prompts),
        "embeddings": {"layers": emb.layers, "reported_layer": cfg.embeddings.layer, "cache_key": emb.key,
                       "cache_path": emb.cache_path, "cache_hit": emb.cache_hit, **emb.info},
        "aqi": aqi,
        "layer_curve": curve,
        "behaviour": behaviour,
        "drift": drift,
        "figures": [str(p) for p in figures],
        "timings": timings,
        "versions": _versions(),
    }
    result = json_ready(result)
    atomic_write_text(out / "eval.json", json.dumps(result, indent=1))
    return result


def _behaviour(cfg: EvalConfig, handle: ModelHandle, prompts, judge, out: Path, timings) -> dict | None:
    b = cfg.behaviour
    if not b.enabled:
        return None
    t = time.perf_counter()
    subset = balanced_subset(prompts, b.limit, cfg.data.seed) if b.limit else list(prompts)
    settings = GenerationSettings(max_new_tokens=b.max_new_tokens, batch_size=b.batch_size, max_length=b.max_length,
                                  progress=cfg.progress)
    result = run_behaviour(subset, handle_generator(handle, settings),
                           handle_renderer(handle.tokenizer, cfg.behaviour_instruction), b.placements,
                           instruction=cfg.behaviour_instruction, judge=judge, n_resamples=cfg.metrics.n_resamples,
                           seed=cfg.metrics.seed, generations_path=out / "generations.jsonl")
    timings["behaviour_s"] = time.perf_counter() - t
    return result


def _drift_settings(cfg: EvalConfig) -> DriftSettings:
    d = cfg.drift
    return DriftSettings(placement=d.placement, max_length=d.max_length, max_prompt_length=d.max_length // 2,
                         batch_size=d.batch_size, collapse_ratio=d.collapse_ratio,
                         n_resamples=cfg.metrics.n_resamples, seed=cfg.metrics.seed, progress=cfg.progress)


def _figures(cfg: EvalConfig, X, labels, curve, fig_dir: Path) -> list[Path]:
    if not cfg.figures.enabled:
        return []
    from ecliptica.evaluation.figures import layer_curve_plot, pca_scatter_3d, tsne_scatter

    paths = [pca_scatter_3d(X, labels, fig_dir / "pca3d.png")]
    if cfg.figures.tsne:
        paths.append(tsne_scatter(X, labels, fig_dir / "tsne.png", seed=cfg.metrics.seed))
    if curve:
        paths.append(layer_curve_plot(curve, fig_dir / "aqi_by_layer.png"))
    return paths


def _summary(aqi: dict, behaviour: dict | None, drift: dict | None) -> dict[str, Any]:
    o = aqi["overall"]
    s: dict[str, Any] = {"aqi": o["aqi"], "aqi_low": o["aqi_ci"]["low"], "aqi_high": o["aqi_ci"]["high"],
                         "probe_auroc": o.get("probe_auroc")}
    if "probe_auroc_ci" in o:
        s.update(probe_auroc_low=o["probe_auroc_ci"]["low"], probe_auroc_high=o["probe_auroc_ci"]["high"])
    for placement, r in (behaviour or {}).items():
        s[f"refusal_rate_unsafe[{placement}]"] = r["refusal_rate_unsafe"]["rate"]
        s[f"over_refusal_rate_safe[{placement}]"] = r["over_refusal_rate_safe"]["rate"]
    if drift:
        s.update(perplexity=drift["perplexity"], perplexity_ratio=drift["perplexity_ratio"],
                 kl_mean_token=drift["kl_mean_token"], collapsed=drift["collapsed"])
    return s


def _write_per_axiom_csv(path: Path, aqi: dict, behaviour: dict | None) -> None:
    """One row per axiom (skipped axioms too, with the reason) plus an `overall` row."""
    axioms = sorted(set(aqi["per_axiom"]) | set(aqi["skipped"]))
    placements = list(behaviour or {})
    cols = ["axiom", "n", "n_safe", "n_unsafe", "aqi", "aqi_low", "aqi_high", "chi", "xb", "silhouette",
            "davies_bouldin", "probe_auroc", "probe_auroc_low", "probe_auroc_high", "skipped_reason"]
    for p in placements:
        cols += [f"refusal_rate_unsafe[{p}]", f"over_refusal_rate_safe[{p}]"]
    rows = []
    for name, entry in [("overall", aqi["overall"])] + [(a, aqi["per_axiom"].get(a)) for a in axioms]:
        row: dict[str, Any] = {"axiom": name}
        if entry is not None:
            sizes = entry["class_sizes"]
            row.update(n=entry["n"], n_safe=sizes.get("safe", 0), n_unsafe=sizes.get("unsafe", 0), aqi=entry["aqi"],
                       aqi_low=entry["aqi_ci"]["low"], aqi_high=entry["aqi_ci"]["high"], chi=entry["chi"],
                       xb=entry["xb"], silhouette=entry["silhouette"], davies_bouldin=entry["davies_bouldin"],
                       probe_auroc=entry.get("probe_auroc"))
            if "probe_auroc_ci" in entry:
                row.update(probe_auroc_low=entry["probe_auroc_ci"]["low"],
                           probe_auroc_high=entry["probe_auroc_ci"]["high"])
        else:
            row["skipped_reason"] = aqi["skipped"][name]
        for p in placements:
            r = behaviour[p]
            cell = ({"refusal_rate_unsafe": r["refusal_rate_unsafe"]["rate"],
                     "over_refusal_rate_safe": r["over_refusal_rate_safe"]["rate"]} if name == "overall"
                    else r["per_axiom"].get(name, {}))
            row[f"refusal_rate_unsafe[{p}]"] = cell.get("refusal_rate_unsafe")
            row[f"over_refusal_rate_safe[{p}]"] = cell.get("over_refusal_rate_safe")
        rows.append(row)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
