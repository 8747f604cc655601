"""Validity analysis: Spearman per variant and behaviour against scipy, bootstrap over arms and seeds, the dev rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import spearmanr

from ecliptica.evaluation.validity import (
    AIM,
    choose_headline,
    main,
    spearman,
    study_rows,
    test_verdict,
    validity_table,
)


def _rows(rng, n_arms=7, n_seeds=3, eval_set="test"):
    """Arms whose `aqi_completion` follows refusal − over-refusal and whose `aqi_prompt` is noise."""
    rows = []
    for a in range(n_arms):
        refusal, over = 0.1 + 0.12 * a, 0.05 + 0.02 * (a % 3)
        for s in range(n_seeds):
            rows.append(
                {
                    "set": eval_set,
                    "arm": f"arm{a}",
                    "seed": s,
                    "refusal_rate_unsafe": refusal + rng.normal(0, 0.01),
                    "over_refusal_rate_safe": over + rng.normal(0, 0.01),
                    "aqi_completion": 0.3 + 0.5 * (refusal - over) + rng.normal(0, 0.005),
                    "aqi_prompt": 0.8 + rng.normal(0, 0.01),
                }
            )
    return rows


def test_spearman_equals_scipy_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.integers(0, 4, 9).astype(float), rng.normal(size=9)
        if np.ptp(x) == 0:
            continue
        assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_rho_is_over_arm_means_against_scipy_and_the_interval_holds_it():
    rng = np.random.default_rng(1)
    rows = _rows(rng)
    table = validity_table(rows, ["aqi_completion", "aqi_prompt"], n_resamples=400, seed=0)
    entry = next(
        e for e in table if e["variant"] == "aqi_completion" and e["behaviour"] == "refusal_minus_over_refusal"
    )
    arms = sorted({r["arm"] for r in rows})
    mean = lambda arm, f: np.mean([f(r) for r in rows if r["arm"] == arm])  # noqa: E731
    x = [mean(a, lambda r: r["aqi_completion"]) for a in arms]
    y = [mean(a, lambda r: r["refusal_rate_unsafe"] - r["over_refusal_rate_safe"]) for a in arms]
    assert entry["rho"] == pytest.approx(spearmanr(x, y).statistic)
    assert entry["rho"] > 0.9 and entry["low"] <= entry["rho"] <= entry["high"]
    assert entry["n_arms"] == 7 and entry["n_runs"] == 21
    # negative control: a variant that is noise has an interval that straddles 0
    noise = next(e for e in table if e["variant"] == "aqi_prompt" and e["behaviour"] == "refusal_minus_over_refusal")
    assert noise["low"] < 0 < noise["high"]


def test_bootstrap_resamples_seeds_too():
    """Seeds that disagree widen the interval: the seed stage is resampled, not only the arms."""
    rng = np.random.default_rng(2)
    calm, noisy = _rows(rng), _rows(rng)
    for r in noisy:
        r["aqi_completion"] += rng.normal(0, 0.15)
    width = lambda rows: next(  # noqa: E731
        e["high"] - e["low"]
        for e in validity_table(rows, ["aqi_completion"], n_resamples=300)
        if e["behaviour"] == "refusal_rate_unsafe"
    )
    assert width(noisy) > width(calm)


def test_missing_number_is_named():
    rows = _rows(np.random.default_rng(3))
    rows[4]["aqi_completion"] = None
    with pytest.raises(ValueError, match="arm 'arm1', seed 1: no 'aqi_completion'"):
        validity_table(rows, ["aqi_completion"], n_resamples=10)


def test_rule_picks_on_dev_and_ties_go_to_the_simpler_variant():
    table = [
        {"set": "dev", "variant": "aqi_learned", "behaviour": "refusal_minus_over_refusal", "rho": 0.86},
        {"set": "dev", "variant": "aqi_completion", "behaviour": "refusal_minus_over_refusal", "rho": 0.83},
        {"set": "dev", "variant": "aqi_prompt", "behaviour": "refusal_minus_over_refusal", "rho": 0.10},
        {"set": "dev", "variant": "aqi_completion_lexical", "behaviour": "refusal_minus_over_refusal", "rho": 0.99},
        {"set": "dev", "variant": "aqi_prompt", "behaviour": "refusal_rate_unsafe", "rho": 0.99},
        {"set": "test", "variant": "aqi_learned", "behaviour": "refusal_minus_over_refusal", "rho": 0.99},
        {"set": "test", "variant": "aqi_completion", "behaviour": "refusal_minus_over_refusal", "rho": 0.7},
    ]
    choice = choose_headline(table)
    # learned is best on dev, completion within 0.05 and simpler; the lexical control and test never count
    assert choice["variant"] == "aqi_completion" and choice["tied"] == ["aqi_completion", "aqi_learned"]
    verdict = test_verdict(table, choice["variant"])
    assert verdict["rho"] == 0.7 and verdict["aim"] == AIM and not verdict["met"]


def test_study_directory_rows_and_cli(tmp_path, capsys):
    rng = np.random.default_rng(4)
    for eval_set in ("dev", "test"):
        for r in _rows(rng, n_arms=5, n_seeds=2, eval_set=eval_set):
            path = tmp_path / "runs" / f"{r['arm']}-s{r['seed']}" / "eval" / eval_set / "eval.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            summary = {k: v for k, v in r.items() if k not in ("set", "arm", "seed", "aqi_prompt")}
            summary["aqi"] = r["aqi_prompt"]  # an older eval.json: `aqi` is the prompt-representation AQI
            path.write_text(json.dumps({"summary": summary}))
    rows = study_rows(tmp_path)
    assert len(rows) == 20 and {r["set"] for r in rows} == {"dev", "test"}
    assert all(r["aqi_prompt"] is not None for r in rows)
    main([str(tmp_path), "--n-resamples", "100", "--json", str(tmp_path / "v.json")])
    out = capsys.readouterr().out
    assert "chosen on dev: aqi_completion" in out
    assert json.loads((tmp_path / "v.json").read_text())["choice"]["variant"] == "aqi_completion"
