"""Discriminant-space AQI, the headline band, BCa intervals and prompt-token pooling, against known answers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ecliptica.data import PromptExample
from ecliptica.evaluation.aqi import AqiStat
from ecliptica.evaluation.config import EmbeddingsSection, MetricsSection
from ecliptica.evaluation.discriminant import (
    BandAqiStat,
    cross_fitted_projection,
    fold_assignment,
    headline_band,
)
from ecliptica.evaluation.embeddings import compute_embeddings, render_prompts, token_spans, user_char_spans
from ecliptica.evaluation.scoring import layer_report
from ecliptica.evaluation.stats import bca_interval, bootstrap_ci, jackknife_indices, resample_indices

METRICS = MetricsSection(n_resamples=1000, seed=0)


def gaussian_classes(n_per: int, d: int, gap: float, seed: int = 0, noise_scale: float = 1.0):
    """Two unit-variance classes whose means differ by `gap` along e_1; the other d-1 axes are noise."""
    rng = np.random.default_rng(seed)
    y = np.repeat(["safe", "unsafe"], n_per)
    X = rng.normal(size=(2 * n_per, d))
    X[:, 1:] *= noise_scale
    X[n_per:, 0] += gap
    return X, y


def population_aqi(gap: float, gamma: float = 0.5) -> float:
    """AQI of the 1-D projection onto the Bayes direction, balanced classes, unit within-class SD.

    B/n = gap^2/4, W/n = 1, so B/(B+W) = (gap^2/4) / (gap^2/4 + 1) and XB = W / (n gap^2) = 1/gap^2.
    """
    share = (gap**2 / 4) / (gap**2 / 4 + 1)
    return gamma * share + (1 - gamma) / (1 + 1 / gap**2)


def keys(n: int) -> list[str]:
    return [f"p{i}" for i in range(n)]


def discriminant_aqi(X, y, folds=5, seed=0) -> float:
    z = cross_fitted_projection(X, y, fold_assignment(keys(len(y)), y, folds, seed))
    return AqiStat()(z[:, None], y)


# --------------------------------------------------------------------------- band and folds


@pytest.mark.parametrize("states,band", [(31, list(range(21, 31))), (33, list(range(22, 33))), (3, [2]), (2, [1])])
def test_headline_band_is_the_last_third_of_decoder_layers(states, band):
    assert headline_band(states) == band


def test_folds_are_stratified_seeded_and_follow_the_prompts_not_their_order():
    y = np.array(["safe"] * 23 + ["unsafe"] * 17)
    folds = fold_assignment(keys(40), y, 5, seed=3)
    for label in ("safe", "unsafe"):
        counts = np.bincount(folds[y == label], minlength=5)
        assert counts.max() - counts.min() <= 1
    perm = np.random.default_rng(0).permutation(40)
    permuted = fold_assignment([keys(40)[i] for i in perm], y[perm], 5, seed=3)
    np.testing.assert_array_equal(permuted, folds[perm])  # same prompt, same fold, whatever the order
    assert not np.array_equal(fold_assignment(keys(40), y, 5, seed=4), folds)


def test_no_prompt_is_projected_by_a_direction_that_saw_it():
    X, y = gaussian_classes(30, 8, gap=1.0)
    folds = fold_assignment(keys(60), y, 5, seed=0)
    z = cross_fitted_projection(X, y, folds)
    moved = X.copy()
    victim = int(np.flatnonzero(folds == 2)[0])
    moved[victim] += 50.0
    z2 = cross_fitted_projection(moved, y, folds)
    same_fold = (folds == 2) & (np.arange(60) != victim)
    np.testing.assert_allclose(z2[same_fold], z[same_fold], rtol=1e-10)  # its fold's direction never saw it
    assert not np.allclose(z2[folds != 2], z[folds != 2])  # the other folds trained on it


# --------------------------------------------------------------------------- known answers


def test_discriminant_aqi_approaches_the_closed_form_population_value():
    X, y = gaussian_classes(2000, 4, gap=1.5, seed=1)
    assert discriminant_aqi(X, y) == pytest.approx(population_aqi(1.5), abs=0.01)


def test_shift_along_the_class_direction_raises_discriminant_aqi():
    values = [discriminant_aqi(*gaussian_classes(150, 32, gap=g, seed=2)) for g in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert values[0] < 0.05 and values[-1] > 0.75


def test_shrinking_class_irrelevant_variance_does_not_raise_it_but_raises_the_geometric_aqi():
    for seed in (3, 4):
        base_X, y = gaussian_classes(150, 32, gap=1.0, seed=seed)
        rotation, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(32, 32)))
        shrunk = base_X.copy()
        shrunk[:, 1:] *= 0.1  # the 31 noise axes lose 99% of their variance
        for turn in (np.eye(32), rotation):  # axis-aligned and not
            before, after = discriminant_aqi(base_X @ turn, y), discriminant_aqi(shrunk @ turn, y)
            # population value 0.35 either way; the shrinkage target moves the estimate by a few hundredths
            assert after == pytest.approx(before, abs=0.03)
            assert AqiStat()(shrunk @ turn, y) > AqiStat()(base_X @ turn, y) + 0.2  # geometric: "better"


def test_ledoit_wolf_shrinkage_and_lda_direction_match_sklearn_and_numpy():
    from sklearn.covariance import ledoit_wolf_shrinkage as sk_shrinkage

    from ecliptica.evaluation.discriminant import ledoit_wolf_shrinkage, shrinkage_lda_direction

    for n, d in ((30, 80), (200, 10)):  # wider than tall (shrinkage needed) and the other way round
        X, y = gaussian_classes(n // 2, d, gap=1.0, seed=7)
        codes = (y == "unsafe").astype(int)
        means = np.stack([X[codes == c].mean(0) for c in (0, 1)])
        Xc = X - means[codes]
        a = sk_shrinkage(Xc, assume_centered=True)
        assert ledoit_wolf_shrinkage(Xc) == pytest.approx(a, rel=1e-10)
        S = Xc.T @ Xc / n
        expected = np.linalg.solve((1 - a) * S + a * np.trace(S) / d * np.eye(d), means[1] - means[0])
        np.testing.assert_allclose(shrinkage_lda_direction(X, codes), expected, rtol=1e-7, atol=1e-10)


def test_band_statistic_is_the_mean_of_layer_aqis_and_its_resamples_match_the_loop():
    layers = [gaussian_classes(40, 6, gap=g, seed=5)[0] for g in (0.5, 1.0, 2.0)]
    y = gaussian_classes(40, 6, gap=0.5, seed=5)[1]
    stacked = np.stack(layers, axis=1)  # (n, layers, d)
    stat = BandAqiStat(0.5)
    assert stat(stacked, y) == pytest.approx(np.mean([AqiStat()(X, y) for X in layers]), abs=1e-12)
    idx = resample_indices(y, 20, seed=1)
    assert stat.on_resamples(stacked, y, idx) == pytest.approx([stat(stacked[r], y[r]) for r in idx], abs=1e-10)


# --------------------------------------------------------------------------- intervals


def test_bca_matches_scipy_on_the_same_bootstrap_distribution():
    from scipy.stats import bootstrap

    sample = np.random.default_rng(0).exponential(size=40)  # skewed: BCa differs from percentile
    res = bootstrap((sample,), np.mean, n_resamples=2000, method="BCa", random_state=1, confidence_level=0.9)
    jack = sample[jackknife_indices(40)].mean(axis=1)
    low, high = bca_interval(res.bootstrap_distribution, float(sample.mean()), jack, alpha=0.1)
    assert (low, high) == pytest.approx((res.confidence_interval.low, res.confidence_interval.high), rel=1e-12)


def test_jackknife_rows_leave_out_exactly_one_index():
    rows = jackknife_indices(5)
    assert rows.shape == (5, 4)
    for i, row in enumerate(rows):
        assert sorted(set(range(5)) - set(row.tolist())) == [i]


def test_interval_contains_its_estimate_or_says_why_not():
    # The case: d=300, gap 0.3; the geometric AQI's bootstrap is shifted far above its estimate.
    X, y = gaussian_classes(100, 300, gap=0.3 * np.sqrt(300), seed=0)
    X[:, 0] = X[:, 0]  # gap along one axis of a 300-d cloud
    for method in ("basic", "bca", "percentile"):
        r = bootstrap_ci(AqiStat(), X, y, n_resamples=1000, seed=0, method=method)
        assert r["contains_estimate"] == (r["low"] <= r["estimate"] <= r["high"])
        assert (r["note"] is None) == r["contains_estimate"]
        if not r["contains_estimate"]:
            assert "bias" in r["note"]
    z = cross_fitted_projection(X, y, fold_assignment(keys(200), y, 5, 0))[:, None]
    headline = bootstrap_ci(AqiStat(), z, y, n_resamples=1000, seed=0, method="bca")
    assert headline["contains_estimate"] and headline["note"] is None  # 1-D: no duplication bias


def test_layer_report_band_lexical_and_per_layer_entries():
    y = np.repeat(["safe", "unsafe"], 30)
    vectors = np.stack([gaussian_classes(30, 10, gap=g, seed=6)[0] for g in (0.0, 1.0, 2.0, 3.0)])
    report = layer_report(vectors, [0, 1, 2, 3], y, keys(60), band=[2, 3], metrics=METRICS)
    per = {e["layer"]: e for e in report["per_layer"]}
    assert report["lexical"]["discriminant"] == per[0]["discriminant"]
    assert report["lexical"]["geometric"]["aqi"] == pytest.approx(per[0]["geometric"]["aqi"], abs=1e-12)
    band_mean = np.mean([per[2]["discriminant"]["aqi"], per[3]["discriminant"]["aqi"]])
    assert report["discriminant"]["aqi"] == pytest.approx(band_mean, abs=1e-12)
    for entry in [report["discriminant"]] + [e["discriminant"] for e in per.values()]:
        assert entry["method"] == "bca" and entry["n_resamples"] == 1000
        assert entry["contains_estimate"] or entry["note"]
    for entry in (report["geometric"], report["lexical"]["geometric"]):
        assert entry["method"] == "basic" and (entry["contains_estimate"] or entry["note"])
    assert per[0]["discriminant"]["aqi"] < per[3]["discriminant"]["aqi"]
    assert report["folds"]["k"] == 5 and sum(report["folds"]["sizes"]) == 60


# --------------------------------------------------------------------------- prompt-token pooling

LLAMA3_STYLE = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = 'You are a helpful assistant.' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- 'Cutting Knowledge Date: December 2023\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
POOL_PROMPTS = [
    PromptExample("How do I pick a lock?", "unsafe", "a", row_id="p1"),
    PromptExample("  Tell me about helpful assistants and system prompts.  ", "safe", "a", row_id="p2"),
    PromptExample("Hi", "safe", "b", row_id="p3"),
]


def _tokenizer(tokenizer, template: str | None):
    tok = copy.deepcopy(tokenizer)
    if template is not None:
        tok.chat_template = template
    return tok


def minimal_window(tok, ids: list[int], words: str) -> tuple[int, int]:
    """Independent reference: the shortest token window at the end whose decoded text contains `words`."""
    start = max(a for a in range(len(ids)) if words in tok.decode(ids[a:]))
    end = min(b for b in range(start + 1, len(ids) + 1) if words in tok.decode(ids[start:b]))
    return start, end


@pytest.mark.parametrize("template", ["smollm2", "llama3"])
@pytest.mark.parametrize("placement", ["none", "system", "prepend"])
def test_prompt_span_is_exactly_the_users_words(tokenizer, template, placement):
    tok = _tokenizer(tokenizer, LLAMA3_STYLE if template == "llama3" else None)
    settings = EmbeddingsSection(placement=placement, instruction=None if placement == "none" else "Be safe now.")
    texts = render_prompts(tok, POOL_PROMPTS, settings)
    spans = user_char_spans(tok, POOL_PROMPTS, settings, texts)
    for p, text, (c0, c1) in zip(POOL_PROMPTS, texts, spans):
        words = p.prompt.strip()
        assert text[c0:c1] == words
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ((t0, t1),) = token_spans(tok, [text], [(c0, c1)], [len(ids)], 512)
        assert (t0, t1) == minimal_window(tok, ids, words)
        if placement != "none":
            assert "Be safe now." in tok.decode(ids[:t0]) and "Be safe now." not in tok.decode(ids[t0:t1])


def test_prompt_pooling_is_the_mean_over_the_users_tokens_of_one_unpadded_forward(tiny_model_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    settings = EmbeddingsSection(batch_size=2)
    texts = render_prompts(tok, POOL_PROMPTS, settings)
    emb = compute_embeddings(
        model, tok, texts, settings, user_char_spans(tok, POOL_PROMPTS, settings, texts), progress=False
    )
    for i, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        start, end = minimal_window(tok, ids, POOL_PROMPTS[i].prompt.strip())
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        assert emb.info["spans"][i] == [start, end]
        for j, layer in enumerate(emb.layers):
            np.testing.assert_allclose(emb.vectors[j, i], hidden[layer][0, start:end].mean(0).numpy(), atol=1e-5)
    assert emb.info["max_pooled_tokens"] < np.mean(emb.info["prompt_tokens"])  # the template is not pooled


def test_truncation_keeps_the_span_on_the_users_last_tokens(tokenizer):
    settings = EmbeddingsSection(max_length=12)
    long = [PromptExample("word " * 40 + "end", "safe", "a", row_id="x")]
    texts = render_prompts(tokenizer, long, settings)
    full = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    ((t0, t1),) = token_spans(tokenizer, texts, user_char_spans(tokenizer, long, settings, texts), [12], 12)
    kept = full[-12:]
    assert t0 == 0 and tokenizer.decode(kept[t0:t1]).strip().endswith("end")
    assert "assistant" in tokenizer.decode(kept[t1:])  # the generation prompt survives, unpooled


# --------------------------------------------------------------------------- negative control: dtype


def test_bf16_and_fp32_embeddings_of_the_same_model_give_the_same_headline(tiny_model_dir):
    # The tiny model on CPU (bf16 matmuls on CPU are slow; docs/aqi.md has the same check on SmolLM2).
    from transformers import AutoTokenizer, LlamaForCausalLM

    from ecliptica.evaluation.prompts import load_eval_prompts

    prompts = load_eval_prompts("demo:eval", "generic", limit=96)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    settings = EmbeddingsSection(batch_size=32)
    texts = render_prompts(tok, prompts, settings)
    chars = user_char_spans(tok, prompts, settings, texts)
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    reports = []
    for dtype in (torch.float32, torch.bfloat16):
        emb = compute_embeddings(model.to(dtype), tok, texts, settings, chars, progress=False)
        band = headline_band(emb.info["num_hidden_states"])
        reports.append(
            layer_report(
                emb.vectors,
                emb.layers,
                [p.label for p in prompts],
                [f"{p.row_id}\x00{p.prompt}" for p in prompts],
                band,
                METRICS,
            )
        )
    fp32, bf16 = reports
    assert fp32["discriminant"]["aqi"] != bf16["discriminant"]["aqi"]  # bf16 really ran
    for kind in ("discriminant", "geometric"):
        spread = fp32[kind]["se"]
        assert abs(bf16[kind]["aqi"] - fp32[kind]["aqi"]) < 0.25 * spread  # far inside the sampling noise
