"""Study report on synthetic records (no model): table, paired tests, answers, files."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from ecliptica.evaluation.aqi import AqiStat
from ecliptica.evaluation.stats import bootstrap_ci, paired_bootstrap_test
from ecliptica.study.contrasts import AqiResamples, combine_over_seeds
from ecliptica.study.records import Embeddings, PromptMismatchError
from ecliptica.study.report import build_report
from ecliptica.study.table import CSV_COLUMNS

N_PER_CLASS, DIM, R = 60, 16, 200
FIGURES = (
    "fig1_aqi_by_method",
    "fig2_delta_aqi_vs_baseline",
    "fig3_grit_effect",
    "fig4_method_pairs",
    "fig5_efficiency",
    "fig6_clusters_3d",
    "training_curves",
)


def _embedding(gap: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(2 * N_PER_CLASS, DIM)).astype(np.float32)
    X[N_PER_CLASS:] += gap  # unsafe half shifted by `gap` in every coordinate
    return X


# sft is the baseline's exact embeddings; dpo_grit is dpo's exact embeddings; cita* are far apart.
EMBEDDING_SPEC = {
    "baseline": (0.1, 1),
    "sft": (0.1, 1),
    "sft_grit": (0.3, 2),
    "dpo": (0.5, 3),
    "dpo_grit": (0.5, 3),
    "cita": (2.0, 4),
    "cita_grit": (2.0, 5),
}
METHOD = {
    "baseline": ("baseline", None),
    "sft": ("sft", "adamw"),
    "sft_grit": ("sft", "grit"),
    "dpo": ("dpo", "adamw"),
    "dpo_grit": ("dpo", "grit"),
    "cita": ("cita", "adamw"),
    "cita_grit": ("cita", "grit"),
}
TRAIN_SECONDS = {
    "sft": 600.0,
    "sft_grit": 900.0,
    "dpo": 1800.0,
    "dpo_grit": 2400.0,
    "cita": 2000.0,
    "cita_grit": 2600.0,
}


def _write_embeddings(path, X, prompt_ids=None):
    labels = np.array(["safe"] * N_PER_CLASS + ["unsafe"] * N_PER_CLASS)
    ids = prompt_ids if prompt_ids is not None else np.array([f"p{i}" for i in range(labels.size)])
    np.savez(path, X=X, labels=labels, axioms=np.array(["harm"] * labels.size), prompt_ids=ids)
    return labels


def _record(tmp, arm, seed=0, gap_seed_offset=0):
    gap, emb_seed = EMBEDDING_SPEC[arm]
    X = _embedding(gap, emb_seed + gap_seed_offset)
    path = tmp / f"{arm}_{seed}.npz"
    labels = _write_embeddings(path, X)
    ci = bootstrap_ci(AqiStat(), X, labels, n_resamples=R, seed=0)
    method, optimizer = METHOD[arm]
    refusal = {"rate": 0.5 + 0.3 * (gap > 1), "low": 0.4, "high": 0.6, "n": N_PER_CLASS}
    record = {
        "arm": arm,
        "seed": seed,
        "method": method,
        "optimizer": optimizer,
        "placement": "prepend" if method == "cita" else "none",
        "overrides": {"optimizer.lr": 1e-4} if arm == "sft" else {},
        "train": None,
        "metrics_path": None,
        "embeddings_path": str(path),
        "eval": {
            "aqi": {"value": ci["estimate"], "low": ci["low"], "high": ci["high"]},
            "probe_auroc": {"value": 0.8, "low": 0.7, "high": 0.9},
            "refusal_rate_unsafe": refusal,
            "over_refusal_rate_safe": {"rate": 0.1, "low": 0.05, "high": 0.2, "n": N_PER_CLASS},
            "perplexity": 10.0,
            "kl_mean_token": 0.01,
            "collapsed": False,
        },
    }
    if arm != "baseline":
        on_cpu = method == "sft"
        record["train"] = {
            "train_seconds": TRAIN_SECONDS[arm],
            "tokens_per_s": 1000.0,
            "peak_gpu_memory_gib": None if on_cpu else 20.0 + (optimizer == "grit"),
            "train_tokens": 10_000,
            "num_processes": 2,
        }
        metrics = tmp / f"{arm}_{seed}_metrics.jsonl"
        lines = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)]
        for line in lines:
            if method in ("dpo", "cita"):
                line["rewards/margins"] = 0.1 * line["step"]
            if method == "cita":
                line["kl"] = 0.01 * line["step"]
        metrics.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        record["metrics_path"] = str(metrics)
    return record


def _records(tmp, arms=tuple(EMBEDDING_SPEC)):
    return [_record(tmp, arm) for arm in arms]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    return build_report(_records(tmp), tmp / "out", n_resamples=R, seed=0)


def _row(report, arm):
    return next(r for r in report["rows"] if r["arm"] == arm)


def _aqi_finding(question, comparison):
    return next(f for f in question["findings"] if f["metric"] == "AQI" and f["comparison"] == comparison)


def test_table_has_one_row_per_arm(report):
    assert [r["arm"] for r in report["rows"]] == list(EMBEDDING_SPEC)


def test_delta_aqi_sign_and_significance(report):
    identical, separated = _row(report, "sft"), _row(report, "cita")
    assert identical["delta_aqi"] == 0.0 and identical["delta_aqi_significant"] is False
    assert identical["delta_aqi_low"] <= 0 <= identical["delta_aqi_high"]
    assert separated["delta_aqi"] > 0.3 and separated["delta_aqi_significant"] is True
    assert separated["delta_aqi_low"] > 0 and separated["delta_aqi_p"] < 0.05
    assert _row(report, "baseline")["delta_aqi"] is None


def test_delta_aqi_is_the_paired_bootstrap_test(tmp_path, report):
    base, cita = np.load(_path(report, "baseline")), np.load(_path(report, "cita"))
    ref = paired_bootstrap_test(AqiStat(), cita["X"], base["X"], base["labels"], n_resamples=R, seed=0)
    row = _row(report, "cita")
    assert (row["delta_aqi"], row["delta_aqi_low"], row["delta_aqi_high"], row["delta_aqi_p"]) == (
        ref["diff"],
        ref["low"],
        ref["high"],
        ref["p_value"],
    )


def _path(report, arm):
    return Path(report["results_json"]).parent.parent / f"{arm}_0.npz"


def test_shared_resamples_reproduce_paired_bootstrap_test():
    """The engine behind multi-seed and interaction contrasts equals paired_bootstrap_test for one pair."""
    labels = np.array(["safe"] * N_PER_CLASS + ["unsafe"] * N_PER_CLASS)
    XA, XB = _embedding(0.5, 1), _embedding(0.3, 2)
    emb = Embeddings(labels=labels, prompt_ids=np.arange(labels.size).astype(str), X={("a", 0): XA, ("b", 0): XB})
    boot = AqiResamples(emb, AqiStat(), R, seed=3)
    estimate = np.array([boot.estimate(("a", 0)) - boot.estimate(("b", 0))])
    samples = (boot.samples(("a", 0)) - boot.samples(("b", 0)))[None, :]
    ours = combine_over_seeds(estimate, samples, 0.05, "basic", np.random.default_rng(0))
    ref = paired_bootstrap_test(AqiStat(), XA, XB, labels, n_resamples=R, seed=3)
    assert ours["estimate"] == pytest.approx(ref["diff"], abs=1e-12)
    assert (ours["low"], ours["high"], ours["p_value"]) == pytest.approx((ref["low"], ref["high"], ref["p_value"]))


def test_interaction_uses_the_same_paired_resamples(report):
    """Single-seed interaction = difference of two paired tests drawn on identical prompt resamples."""
    q3 = report["questions"]["Q3"]
    interaction = _aqi_finding(q3, "(cita_grit − cita) − (dpo_grit − dpo)")
    cita_effect = _aqi_finding(report["questions"]["Q2"], "cita_grit − cita")
    dpo_effect = _aqi_finding(report["questions"]["Q2"], "dpo_grit − dpo")
    assert interaction["estimate"] == pytest.approx(cita_effect["estimate"] - dpo_effect["estimate"])
    assert interaction["answerable"] and "p =" in interaction["text"]


def test_grit_effect_for_identical_pair_is_not_significant(report):
    finding = _aqi_finding(report["questions"]["Q2"], "dpo_grit − dpo")
    assert finding["estimate"] == 0.0 and finding["significant"] is False
    assert "not significant at α=0.05" in finding["text"]


def test_single_seed_is_flagged(report):
    for question in report["questions"].values():
        assert any("seed-to-seed variance is not captured" in n for n in question["notes"])


def test_efficiency_equals_delta_over_hours(report):
    row = _row(report, "dpo")
    hours = TRAIN_SECONDS["dpo"] * 2 / 3600
    assert row["efficiency"] == pytest.approx(row["delta_aqi"] / hours)
    assert row["compute_device"] == "GPU" and row["efficiency_unit"] == "ΔAQI per GPU-hour"
    cpu = _row(report, "sft")
    assert cpu["compute_device"] == "CPU" and cpu["efficiency_unit"] == "ΔAQI per CPU-hour"
    md = open(report["results_md"]).read()
    assert "n/a (CPU)" in md and "optimizer.lr=0.0001" in md


def test_shared_device_divides_device_hours_and_is_noted(tmp_path):
    """Two study workers on one GPU: each run had about half of it, so its GPU-hours are half its wall time."""
    records = _records(tmp_path)
    for r in records:
        if r.get("train"):
            r["train"]["device_shared_by"] = 2
    out = build_report(records, tmp_path / "out", n_resamples=50, figures=False)
    row = _row(out, "dpo")
    assert row["efficiency"] == pytest.approx(row["delta_aqi"] / (TRAIN_SECONDS["dpo"] * 2 / 2 / 3600))
    assert "2 study workers shared each device" in open(out["results_md"]).read()


def test_figures_exist_as_png_and_pdf(report):
    assert set(report["figures"]) == set(FIGURES)
    for paths in report["figures"].values():
        for kind in ("png", "pdf"):
            with open(paths[kind], "rb") as f:
                assert len(f.read()) > 1000


def test_csv_parses_with_the_right_columns(report):
    with open(report["results_csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_COLUMNS and len(rows) == 7
    assert float(rows[[r["arm"] for r in rows].index("cita")]["delta_aqi"]) > 0


def test_json_holds_rows_and_answers(report):
    data = json.load(open(report["results_json"]))
    assert len(data["rows"]) == 7 and set(data["questions"]) == {"Q1", "Q2", "Q3", "Q4"}
    assert data["notes"] == []  # recorded AQI equals the recomputed one


def test_missing_arm_makes_question_not_answerable(tmp_path):
    arms = [a for a in EMBEDDING_SPEC if a != "cita_grit"]
    out = build_report(_records(tmp_path, arms), tmp_path / "out", n_resamples=50, figures=False)
    q3 = out["questions"]["Q3"]
    assert q3["status"] == "not answerable"
    assert all("not answerable: arm cita_grit missing" in f["text"] for f in q3["findings"])
    assert out["questions"]["Q2"]["status"] == "partly answerable"
    assert "not answerable: arm cita_grit missing" in open(out["results_md"]).read()


def test_mismatched_prompt_ids_raise(tmp_path):
    records = _records(tmp_path, ("baseline", "dpo"))
    ids = np.array([f"p{i}" for i in range(2 * N_PER_CLASS)])
    ids[[3, 4]] = ids[[4, 3]]
    _write_embeddings(records[1]["embeddings_path"], _embedding(0.5, 3), prompt_ids=ids)
    with pytest.raises(PromptMismatchError, match="prompt_ids differ .* first at row 3"):
        build_report(records, tmp_path / "out", n_resamples=20)


def test_several_seeds_average_per_seed_deltas(tmp_path):
    records = [_record(tmp_path, "baseline")]
    for seed in (0, 1, 2):
        records += [_record(tmp_path, arm, seed, gap_seed_offset=10 * seed) for arm in ("dpo", "dpo_grit")]
    out = build_report(records, tmp_path / "out", n_resamples=50, figures=False)
    row = next(r for r in out["rows"] if r["arm"] == "dpo")
    finding = _aqi_finding(out["questions"]["Q2"], "dpo_grit − dpo")
    assert row["n_seeds"] == 3 and row["aqi_sd"] is not None and row["ci_over"].startswith("seeds")
    assert finding["n_seeds"] == 3 and finding["estimate"] == 0.0 and not finding["significant"]
    per_seed = [r["eval"]["aqi"]["value"] for r in records if r["arm"] == "dpo"]
    assert row["aqi"] == pytest.approx(np.mean(per_seed))


def test_rate_interval_over_seeds_is_the_t_interval_clipped_to_0_1():
    from scipy import stats

    from ecliptica.study.table import summarize_over_seeds

    vals = [0.2, 0.9, 0.95]
    lo, hi = stats.t.interval(0.95, 2, loc=np.mean(vals), scale=stats.sem(vals))
    mean, sd, low, high = summarize_over_seeds(vals, None, 0.05)
    assert (low, high) == pytest.approx((lo, hi)) and lo < 0 < 1 < hi  # unbounded: leaves [0, 1] here
    assert summarize_over_seeds(vals, None, 0.05, bounds=(0.0, 1.0))[2:] == (0.0, 1.0)
    assert mean == pytest.approx(np.mean(vals)) and sd == pytest.approx(np.std(vals, ddof=1))
