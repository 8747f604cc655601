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
from ecliptica.data.packaged import provenance
from ecliptica.evaluation.adapter_check import check_adapter_files
from ecliptica.evaluation.behaviour import handle_generator, handle_renderer, run_behaviour, run_jailbreaks
from ecliptica.evaluation.behaviour_aqi import behaviour_aqi_step, behaviour_aqi_summary
from ecliptica.evaluation.capability import capability_summary, run_capability
from ecliptica.evaluation.config import EvalConfig
from ecliptica.evaluation.discriminant import headline_band
from ecliptica.evaluation.drift import load_benign_pairs, run_drift
from ecliptica.evaluation.embeddings import embed_prompts
from ecliptica.evaluation.judges import build_judge
from ecliptica.evaluation.model_handle import ModelHandle
from ecliptica.evaluation.preference import load_preference_pairs, run_preference
from ecliptica.evaluation.prompts import balanced_subset, load_eval_prompts, prompts_hash
from ecliptica.evaluation.refusal import RefusalJudge, describe_judge
from ecliptica.evaluation.scoring import evaluate_embeddings, json_ready, layer_report
from ecliptica.models import cache_dir as default_cache_root
from ecliptica.provenance import git_commit, versions
from ecliptica.runio import DirLock, atomic_write_text, write_jsonl

log = logging.getLogger(__name__)


def prompts_from_config(cfg: EvalConfig) -> list[PromptExample]:
    d = cfg.data
    return load_eval_prompts(
        d.path,
        d.format,
        limit=d.limit,
        per_group=d.per_group,
        seed=d.seed,
        benign_path=d.benign_path,
        benign_format=d.benign_format,
        on_bad_row=d.on_bad_row,
    )


def _data_summary(cfg: EvalConfig, prompts: Sequence[PromptExample]) -> dict[str, Any]:
    groups = Counter(f"{p.axiom}/{p.label}" for p in prompts)
    return {
        "path": cfg.data.path,
        "format": cfg.data.format,
        "benign_path": cfg.data.benign_path,
        # package, version, sha256 and licence of a `pkg:` file; the sha256 of any other local file
        "provenance": [provenance(p) for p in (cfg.data.path, cfg.data.benign_path) if p],
        "n_prompts": len(prompts),
        "labels": dict(Counter(p.label for p in prompts)),
        "groups": dict(sorted(groups.items())),
        "data_hash": prompts_hash(prompts),
    }


def run_eval(
    cfg: EvalConfig,
    *,
    handle: ModelHandle | None = None,
    prompts: Sequence[PromptExample] | None = None,
    judge: RefusalJudge | None = None,
) -> dict[str, Any]:
    """Evaluate one model and write every artefact under cfg.out_dir; returns what eval.json holds.

    `handle`: an already-loaded base (its adapter is switched to cfg.adapter); `prompts`: reuse a
    loaded prompt set; `judge`: a refusal judge instead of the one `behaviour.judge` names. out_dir is
    locked (one evaluation writes it at a time) before the model loads. The adapter's files are checked before
    anything is written (adapter_check), its fit to the base once the base is loaded.
    """
    if cfg.adapter is not None:
        check_adapter_files(cfg.adapter, handle.name if handle is not None else cfg.model.name)
    with DirLock(cfg.out_dir, "eval"):
        return _run_eval(cfg, handle=handle, prompts=prompts, judge=judge)


def _run_eval(
    cfg: EvalConfig, *, handle: ModelHandle | None, prompts: Sequence[PromptExample] | None, judge: RefusalJudge | None
) -> dict[str, Any]:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(cfg.out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    if handle is None:
        handle = ModelHandle.load(cfg.model)
    handle.set_adapter(cfg.adapter)
    prompts = list(prompts) if prompts is not None else prompts_from_config(cfg)
    labels, axioms = [p.label for p in prompts], [p.axiom for p in prompts]
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_root() / "embeddings"
    m = cfg.metrics

    t = time.perf_counter()
    with handle.merged(cfg.merge_adapter):
        emb = embed_prompts(handle, prompts, cfg.embeddings, cache, progress=cfg.progress)
        timings["embeddings_s"] = time.perf_counter() - t
        behaviour, jailbreak, judge_info = _behaviour(cfg, handle, prompts, judge, out, timings)
        # one more forward over prompt + its judged completion: the AQI of what the model did
        aqi_behaviour = behaviour_aqi_step(cfg, handle, out / "generations.jsonl") if behaviour else None
        if aqi_behaviour:
            timings["behaviour_aqi_s"] = aqi_behaviour["cost"]["total_s"]
    X = emb.at(cfg.embeddings.layer)

    t = time.perf_counter()
    aqi = evaluate_embeddings(X, labels, axioms, m, pca_dim=cfg.embeddings.pca_dim)
    aqi_layers = layer_report(
        emb.vectors,
        emb.layers,
        labels,
        [f"{p.row_id}\x00{p.prompt}" for p in prompts],
        _band(cfg, emb.info["num_hidden_states"]),
        m,
        pca_dim=cfg.embeddings.pca_dim,
    )
    timings["metrics_s"] = time.perf_counter() - t
    _write_band_projections(out / BAND_PROJECTIONS, aqi_layers.pop("band_projections"), prompts, aqi_layers)

    drift = preference = None
    if cfg.drift.enabled:
        t = time.perf_counter()
        d = cfg.drift
        drift, per_example = run_drift(
            handle,
            load_benign_pairs(d.path, d.format, d.category, d.limit),
            d,
            n_resamples=m.n_resamples,
            seed=m.seed,
            progress=cfg.progress,
        )
        write_jsonl(out / "drift_examples.jsonl", per_example)
        timings["drift_s"] = time.perf_counter() - t
    if cfg.preference.enabled:
        t = time.perf_counter()
        preference = run_preference(
            handle,
            load_preference_pairs(cfg.preference),
            cfg.preference,
            n_resamples=m.n_resamples,
            seed=m.seed,
            progress=cfg.progress,
            pairs_path=out / "preference_pairs.jsonl",
        )
        timings["preference_s"] = time.perf_counter() - t

    capability = None
    if cfg.capability.enabled:
        t = time.perf_counter()
        capability, per_question = run_capability(handle, cfg.capability, alpha=m.alpha, progress=cfg.progress)
        for name, rows in per_question.items():
            write_jsonl(out / f"capability_{name}.jsonl", rows)
        timings["capability_s"] = time.perf_counter() - t

    figures = _figures(cfg, X, labels, aqi_layers, out / "figures")
    _write_per_axiom_csv(out / "per_axiom.csv", aqi, behaviour)
    timings["total_s"] = time.perf_counter() - t_start
    result = {
        "summary": {
            **_summary(aqi, aqi_layers, behaviour, jailbreak, drift, preference, cfg),
            **capability_summary(capability),
            **behaviour_aqi_summary(aqi_behaviour),
        },
        "settings": cfg.model_dump(mode="json"),
        "model": handle.identity(),
        "data": _data_summary(cfg, prompts),
        "embeddings": {
            "layers": emb.layers,
            "reported_layer": cfg.embeddings.layer,
            "cache_key": emb.key,
            "cache_path": emb.cache_path,
            "cache_hit": emb.cache_hit,
            **emb.info,
            "prompt_ids": [p.row_id for p in prompts],
        },
        "aqi_layers": aqi_layers,
        "aqi_behaviour": aqi_behaviour,
        "aqi": aqi,
        "behaviour": behaviour,
        "jailbreak": jailbreak,
        "refusal_judge": judge_info,  # which judge labelled generations.jsonl and the jailbreak completions
        "drift": drift,
        "preference": preference,
        "capability": capability,
        "figures": [str(p) for p in figures],
        "timings": timings,
        "versions": versions(),
        "git_commit": git_commit(),
    }
    result = json_ready(result)
    atomic_write_text(out / "eval.json", json.dumps(result, indent=1))
    return result


def _behaviour(
    cfg: EvalConfig, handle: ModelHandle, prompts, judge, out: Path, timings
) -> tuple[dict | None, dict | None, dict | None]:
    """(refusal metrics per placement variant, jailbreak metrics, the judge's description), or Nones when
    disabled."""
    b = cfg.behaviour
    if not b.enabled:
        return None, None, None
    t = time.perf_counter()
    judge = judge or build_judge(
        b.judge, trust_remote_code=b.judge_trust_remote_code, batch_size=b.batch_size, progress=cfg.progress
    )
    subset = balanced_subset(prompts, b.limit, cfg.data.seed) if b.limit else list(prompts)
    generate = handle_generator(handle, b, cfg.progress)
    render = handle_renderer(handle.tokenizer, cfg.behaviour_instruction)
    common = dict(
        instruction=cfg.behaviour_instruction, judge=judge, n_resamples=cfg.metrics.n_resamples, seed=cfg.metrics.seed
    )
    result = run_behaviour(subset, generate, render, b.placements, generations_path=out / "generations.jsonl", **common)
    jailbreak = None
    if b.jailbreak.enabled:
        unsafe = [p for p in prompts if p.label == "unsafe"]
        if b.jailbreak.limit and unsafe:
            unsafe = balanced_subset(unsafe, b.jailbreak.limit, cfg.data.seed)
        if unsafe:
            jailbreak = run_jailbreaks(
                unsafe,
                generate,
                render,
                b.shown_placement,
                templates=b.jailbreak.templates,
                generations_path=out / "jailbreak_generations.jsonl",
                **common,
            )
    timings["behaviour_s"] = time.perf_counter() - t
    return result, jailbreak, describe_judge(judge)


BAND_PROJECTIONS = "aqi_band_projections.npz"


def _write_band_projections(path: Path, Z, prompts: Sequence[PromptExample], aqi_layers: dict) -> None:
    """The headline's held-out projections (n x band, float64): `BandAqiStat(gamma)(Z, labels)` is `aqi`."""
    import numpy as np

    np.savez(
        path,
        Z=np.asarray(Z, dtype=np.float64),
        labels=np.array([p.label for p in prompts]),
        prompt_ids=np.array([p.row_id for p in prompts]),
        layers=np.asarray(aqi_layers["band"]["layers"]),
    )


def _band(cfg: EvalConfig, num_hidden_states: int) -> list[int]:
    """The fixed headline band with a sweep; without one, the single layer asked for."""
    if cfg.embeddings.layer_sweep:
        return headline_band(num_hidden_states)
    return [cfg.embeddings.layer % num_hidden_states]


def _figures(cfg: EvalConfig, X, labels, aqi_layers: dict, fig_dir: Path) -> list[Path]:
    if not cfg.figures.enabled:
        return []
    from ecliptica.evaluation.figures import layer_curve_plot, pca_scatter_3d, tsne_scatter

    paths = [pca_scatter_3d(X, labels, fig_dir / "pca3d.png")]
    if cfg.figures.tsne:
        paths.append(tsne_scatter(X, labels, fig_dir / "tsne.png", seed=cfg.metrics.seed))
    if cfg.embeddings.layer_sweep:
        paths.append(layer_curve_plot(aqi_layers["per_layer"], fig_dir / "aqi_by_layer.png"))
    return paths


def _summary(
    aqi: dict,
    aqi_layers: dict,
    behaviour: dict | None,
    jailbreak: dict | None,
    drift: dict | None,
    preference: dict | None,
    cfg: EvalConfig,
) -> dict[str, Any]:
    """Headline numbers. `aqi` (also under its explicit name `aqi_prompt`): the prompt-representation AQI,
    discriminant, headline band mean; `aqi_geometric`: the same band, geometric; `*_lexical`: layer 0 (the token
    embeddings of the pooled words). The behaviour variants are added by `behaviour_aqi_summary`."""
    o = aqi["overall"]
    s: dict[str, Any] = {"probe_auroc": o.get("probe_auroc")}
    for name, entry in (
        ("aqi", aqi_layers["discriminant"]),
        ("aqi_prompt", aqi_layers["discriminant"]),
        ("aqi_geometric", aqi_layers["geometric"]),
        ("aqi_lexical", aqi_layers["lexical"]["discriminant"]),
        ("aqi_geometric_lexical", aqi_layers["lexical"]["geometric"]),
    ):
        s.update({name: entry["aqi"], f"{name}_low": entry["low"], f"{name}_high": entry["high"]})
    if "probe_auroc_ci" in o:
        s.update(probe_auroc_low=o["probe_auroc_ci"]["low"], probe_auroc_high=o["probe_auroc_ci"]["high"])
    for placement, r in (behaviour or {}).items():
        s[f"refusal_rate_unsafe[{placement}]"] = r["refusal_rate_unsafe"]["rate"]
        s[f"over_refusal_rate_safe[{placement}]"] = r["over_refusal_rate_safe"]["rate"]
    if behaviour:  # the headline rates come from one named variant, so a table can say which it shows
        shown = behaviour[cfg.behaviour.shown_placement]
        s["behaviour_shown_placement"] = cfg.behaviour.shown_placement
        s["refusal_judge"] = cfg.behaviour.judge
        for key in ("refusal_rate_unsafe", "over_refusal_rate_safe"):
            s.update(
                {
                    key: shown[key]["rate"],
                    f"{key}_low": shown[key]["wilson_low"],
                    f"{key}_high": shown[key]["wilson_high"],
                }
            )
        unsafe_classes = shown.get("classes", {}).get("unsafe", {})
        if unsafe_classes and shown["refusal_rate_unsafe"]["total"]:
            s["full_refusal_rate_unsafe"] = unsafe_classes["full_refusal"] / shown["refusal_rate_unsafe"]["total"]
    if jailbreak:
        j = jailbreak["overall"]
        s.update(
            jailbreak_refusal_rate=j["rate"],
            jailbreak_refusal_rate_low=j["wilson_low"],
            jailbreak_refusal_rate_high=j["wilson_high"],
        )
    if drift:
        s.update(
            perplexity=drift["perplexity"],
            perplexity_ratio=drift["perplexity_ratio"],
            kl_mean_token=drift["kl_mean_token"],
            collapsed=drift["collapsed"],
            drift_n_examples=drift["n_examples"],
        )
        for key in ("perplexity_ratio", "kl"):
            ci = drift[f"{key}_ci"]
            name = "kl_mean_token" if key == "kl" else key
            s.update({f"{name}_low": ci["low"] if ci else None, f"{name}_high": ci["high"] if ci else None})
    if preference:
        s.update(
            preference_reward_accuracy=preference["reward_accuracy"],
            preference_reward_margin=preference["reward_margin"],
            preference_logp_accuracy=preference["logp_accuracy"],
            preference_n_pairs=preference["n_pairs"],
        )
    return s


def _write_per_axiom_csv(path: Path, aqi: dict, behaviour: dict | None) -> None:
    """One row per axiom (skipped axioms too, with the reason) plus an `overall` row.

    The AQI here is the geometric one at `embeddings.layer` (per axiom); the headline is in eval.json."""
    axioms = sorted(set(aqi["per_axiom"]) | set(aqi["skipped"]))
    placements = list(behaviour or {})
    cols = [
        "axiom",
        "n",
        "n_safe",
        "n_unsafe",
        "aqi_geometric",
        "aqi_geometric_low",
        "aqi_geometric_high",
        "chi",
        "xb",
        "silhouette",
        "davies_bouldin",
        "probe_auroc",
        "probe_auroc_low",
        "probe_auroc_high",
        "skipped_reason",
    ]
    for p in placements:
        cols += [f"refusal_rate_unsafe[{p}]", f"over_refusal_rate_safe[{p}]"]
    rows = []
    for name, entry in [("overall", aqi["overall"])] + [(a, aqi["per_axiom"].get(a)) for a in axioms]:
        row: dict[str, Any] = {"axiom": name}
        if entry is not None:
            sizes = entry["class_sizes"]
            row.update(
                n=entry["n"],
                n_safe=sizes.get("safe", 0),
                n_unsafe=sizes.get("unsafe", 0),
                aqi_geometric=entry["aqi"],
                aqi_geometric_low=entry["aqi_ci"]["low"],
                aqi_geometric_high=entry["aqi_ci"]["high"],
                chi=entry["chi"],
                xb=entry["xb"],
                silhouette=entry["silhouette"],
                davies_bouldin=entry["davies_bouldin"],
                probe_auroc=entry.get("probe_auroc"),
            )
            if "probe_auroc_ci" in entry:
                row.update(
                    probe_auroc_low=entry["probe_auroc_ci"]["low"], probe_auroc_high=entry["probe_auroc_ci"]["high"]
                )
        else:
            row["skipped_reason"] = aqi["skipped"][name]
        for p in placements:
            r = behaviour[p]
            cell = (
                {
                    "refusal_rate_unsafe": r["refusal_rate_unsafe"]["rate"],
                    "over_refusal_rate_safe": r["over_refusal_rate_safe"]["rate"],
                }
                if name == "overall"
                else r["per_axiom"].get(name, {})
            )
            row[f"refusal_rate_unsafe[{p}]"] = cell.get("refusal_rate_unsafe")
            row[f"over_refusal_rate_safe[{p}]"] = cell.get("over_refusal_rate_safe")
        rows.append(row)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
