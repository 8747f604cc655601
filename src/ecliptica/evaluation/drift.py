"""Capability drift: perplexity of held-out benign responses and token KL(model || base).

Default data: the chosen answers of the `benign` pairs in the bundled `demo:preferences`. Pairs are
tokenised by the training code (`data.tokenize_pairs`: same chat template, prompt and response
tokenised separately, response ends with EOS), and only response tokens are scored.

  perplexity = exp(sum of response-token NLL / number of response tokens)   (token-weighted)
  kl         = mean over response-predicting positions of KL(p_model || p_base), full vocabulary

The base is the same network with the adapter disabled; without an adapter the model *is* the base,
so KL = 0 and the ratio is 1 by definition (no second pass). `collapsed` is set when
perplexity / base perplexity exceeds `collapse_ratio` (default 2: the model finds ordinary benign
answers twice as surprising as before training, a level far beyond run-to-run noise).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ecliptica.data import Placement, PreferenceExample, TokenizeSettings, load_preferences, resolve_path, tokenize_pairs
from ecliptica.evaluation.inputs import length_sorted_batches, model_device, pad_batch
from ecliptica.evaluation.stats import percentile_interval


@dataclass(frozen=True)
class DriftSettings:
    placement: Placement = "none"
    max_length: int = 1024
    max_prompt_length: int = 512
    batch_size: int = 8
    collapse_ratio: float = 2.0
    n_resamples: int = 1000
    seed: int = 0
    progress: bool = True


def load_benign_pairs(path: str = "demo:preferences", format: str = "generic", category: str | None = "benign",
                      limit: int | None = None) -> list[PreferenceExample]:
    """Preference pairs whose chosen answers are benign; `category=None` keeps every pair."""
    examples = load_preferences(resolve_path(path), format).examples
    if category is not None:
        examples = [e for e in examples if e.category == category]
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise ValueError(f"{path}: no pairs with category {category!r} for the drift check "
                         "(set drift.category: null to use every pair)")
    return examples


def _sequences(tokenizer, examples: Sequence[PreferenceExample], s: DriftSettings):
    data = tokenize_pairs(tokenizer, list(examples), s.placement,
                          TokenizeSettings(max_length=s.max_length, max_prompt_length=s.max_prompt_length),
                          progress=False)
    return [(list(p.prompt_ids), list(p.chosen_ids)) for p in data.pairs]


def _response_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log-softmax (fp32) at every position that predicts a response token: (n_tokens, vocab)."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    return torch.log_softmax(logits[targets].float(), dim=-1)


@torch.inference_mode()
def token_scores(handle, examples: Sequence[PreferenceExample], s: DriftSettings,
                 with_reference: bool) -> dict[str, np.ndarray]:
    """Per example: summed response NLL under the model (and the base) and summed token KL."""
    tok = handle.tokenizer
    seqs = _sequences(tok, examples, s)
    n = len(seqs)
    nll, ref_nll, kl = np.zeros(n), np.zeros(n), np.zeros(n)
    tokens = np.array([len(r) for _, r in seqs], dtype=float)
    batches = list(length_sorted_batches([len(p) + len(r) for p, r in seqs], s.batch_size))
    for batch in tqdm(batches, desc="drift", disable=not s.progress, leave=False):
        with handle.active() as model:
            device = model_device(model)
            ids, mask = pad_batch([seqs[i][0] + seqs[i][1] for i in batch], tok.pad_token_id, "right", device)
            is_response = torch.zeros_like(mask, dtype=torch.bool)
            for row, i in enumerate(batch):
                p, r = seqs[i]
                is_response[row, len(p):len(p) + len(r)] = True
            targets = is_response[:, 1:]  # position t predicts token t + 1
            labels = ids[:, 1:][targets]
            row_of = torch.arange(len(batch), device=device)[:, None].expand_as(targets)[targets].cpu().numpy()
            logp = _response_logprobs(model, ids, mask, targets)
        token_nll = -logp.gather(-1, labels[:, None]).squeeze(-1)
        np.add.at(nll, np.asarray(batch)[row_of], token_nll.cpu().double().numpy())
        if with_reference:
            with handle.reference() as base:
                ref_logp = _response_logprobs(base, ids, mask, targets)
            ref_token_nll = -ref_logp.gather(-1, labels[:, None]).squeeze(-1)
            token_kl = (logp.exp() * (logp - ref_logp)).sum(-1)
            np.add.at(ref_nll, np.asarray(batch)[row_of], ref_token_nll.cpu().double().numpy())
            np.add.at(kl, np.asarray(batch)[row_of], token_kl.cpu().double().numpy())
    if not with_reference:
        ref_nll = nll.copy()
    return {"nll": nll, "ref_nll": ref_nll, "kl": kl, "tokens": tokens}


def _ratio_ci(num: np.ndarray, den: np.ndarray, transform, n_resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap over examples of transform(sum num / sum den)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, num.size, size=(n_resamples, num.size))
    return percentile_interval(transform(num[idx].sum(1) / den[idx].sum(1)), 0.05)


def drift_metrics(scores: dict[str, np.ndarray], s: DriftSettings, has_adapter: bool) -> dict[str, Any]:
    nll, ref_nll, kl, tokens = scores["nll"], scores["ref_nll"], scores["kl"], scores["tokens"]
    total = tokens.sum()
    ppl, base_ppl = float(np.exp(nll.sum() / total)), float(np.exp(ref_nll.sum() / total))
    ratio = ppl / base_ppl
    low, high = _ratio_ci(nll, tokens, np.exp, s.n_resamples, s.seed)
    k_low, k_high = _ratio_ci(kl, tokens, lambda x: x, s.n_resamples, s.seed)
    result = {
        "n_examples": int(tokens.size), "n_response_tokens": int(total),
        "perplexity": ppl, "perplexity_ci": {"low": low, "high": high, "method": "percentile bootstrap over examples"},
        "base_perplexity": base_ppl, "perplexity_ratio": ratio,
        "kl_mean_token": float(kl.sum() / total) if has_adapter else 0.0,
        "kl_ci": {"low": k_low, "high": k_high} if has_adapter else None,
        "collapse_ratio": s.collapse_ratio, "collapsed": bool(ratio > s.collapse_ratio),
        "placement": s.placement,
    }
    if not has_adapter:
        result["note"] = "no adapter: the evaluated model is the base (KL = 0, ratio = 1 by definition)"
    return result


def run_drift(handle, examples: Sequence[PreferenceExample], s: DriftSettings) -> dict[str, Any]:
    has_adapter = handle.adapter_path is not None
    return drift_metrics(token_scores(handle, examples, s, with_reference=has_adapter), s, has_adapter)
