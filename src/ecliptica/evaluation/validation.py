"""Validation scores of a LoRA policy being calibrated, against its base (the same network, adapter disabled).

  reward(y)  = beta * (log pi(y|x) - log pi_base(y|x))      (DPO's implicit reward; sums over response tokens)
  accuracy   = share of pairs with reward(chosen) > reward(rejected)   (strict, as TRL's rewards/accuracies:
               an untrained adapter ties every pair and scores 0)
  margin     = mean of reward(chosen) - reward(rejected)
  kl         = sum over response tokens of KL(pi || pi_base), full vocabulary / number of response tokens

Log-probs and the KL come from `train.policy.PolicyModel`, the forward the training losses use, so a
score here and a training metric of the same name are the same number. This works on the Trainer's own
`PolicyModel` right after training (study calibration); `evaluation/preference.py` computes the same
accuracy / margin for a loaded model through the evaluator's `ModelHandle`. Batches are padded rows, not one
packed row: a packed row of a whole scoring batch makes attention cost grow with the square of its length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ecliptica.data import TokenizedPair
from ecliptica.losses.layout import CHOSEN_ONLY, PAIRED
from ecliptica.train.batching import collate
from ecliptica.train.policy import PolicyModel


def _batches(pairs: Sequence[TokenizedPair], batch_size: int, desc: str, progress: bool):
    starts = range(0, len(pairs), batch_size)
    for s in tqdm(starts, desc=desc, disable=not progress, leave=False):
        yield list(pairs[s : s + batch_size])


@torch.no_grad()
def preference_scores(
    policy: PolicyModel,
    pairs: Sequence[TokenizedPair],
    pad_token_id: int,
    *,
    beta: float,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """rewards/accuracies and rewards/margins of `policy` on preference pairs (see the module docstring)."""
    if not pairs:
        raise ValueError("preference_scores: no pairs to score")
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    margins = []
    try:
        for batch_pairs in _batches(pairs, batch_size, "validation pairs", progress):
            batch = collate(batch_pairs, PAIRED, pad_token_id, packed=False).to(device)
            s = policy(batch, need_reference=True)
            ratio = (s.logps - s.ref_logps).float()
            chosen, rejected = PAIRED.split(ratio)
            margins.append(beta * (chosen - rejected))
    finally:
        policy.train(was_training)
    m = torch.cat(margins)
    return {
        "rewards/accuracies": float((m > 0).float().mean()),
        "rewards/margins": float(m.mean()),
        "n_pairs": int(m.numel()),
        "beta": beta,
    }


@torch.no_grad()
def response_kl(
    policy: PolicyModel,
    pairs: Sequence[TokenizedPair],
    pad_token_id: int,
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Mean token KL(policy || base) over the chosen responses of `pairs` (token-weighted, as drift's kl)."""
    if not pairs:
        raise ValueError("response_kl: no pairs to score")
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    kl_sum, n_tokens = 0.0, 0
    try:
        for batch_pairs in _batches(pairs, batch_size, "benign KL", progress):
            batch = collate(batch_pairs, CHOSEN_ONLY, pad_token_id, packed=False).to(device)
            s = policy(batch, need_token_kl=True)
            kl_sum += float(s.token_kl_sum)
            n_tokens += int(s.n_tokens.sum())
    finally:
        policy.train(was_training)
    return {"kl_mean_token": kl_sum / n_tokens, "n_response_tokens": n_tokens, "n_pairs": len(pairs)}
