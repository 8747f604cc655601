"""The validation curve: every `train.val_every` optimizer steps (and after the last one) the held-out validation
pairs (`data.val_fraction`) are scored with the policy being trained, so convergence can be read against steps and
against training compute.

  val/pref_accuracy  share of pairs with r(chosen) > r(rejected), r(y) = val_reward_beta * (log pi - log pi_base)
                     (TRL's rewards/accuracies; strict, so an untrained adapter scores 0). One beta for every method,
                     as calibration scores its points (study/calibration.py), so SFT has a curve too.
  val/pref_margin    mean r(chosen) - r(rejected)
  val/loss           the method's own loss on the validation examples, laid out as the method trains (its layout),
                     at the schedule position of the step just taken (CITA's lambda); batches of `val_batch_size`
                     examples weighted as the engine weights a step's micro-batches, so a loss that is a mean over
                     examples or over response tokens is that mean over the whole validation split (KTO's KL
                     estimate is per batch, as in training)
  gpu_seconds        cumulative training compute: wall seconds of the optimizer steps (forward, backward, update,
                     synchronised with the card), x the number of processes. Validation, checkpoint writes and
                     logging are outside it. On a CPU the same key holds CPU wall seconds.

Log-probs come from `train.policy.PolicyModel` (the training forward) and, for layouts without pairs (SFT's chosen
only, KTO's unpaired), the accuracy from `evaluation.validation.preference_scores`, the scorer calibration uses.
For paired methods one pass with the reference gives both the loss and the accuracy. Scoring runs in eval mode under
no_grad and under a forked RNG, so it changes neither the weights nor the random stream training draws next
(tests/train/test_validation.py trains the same weights with and without it). Every process scores the whole split
on its own copy, with no collective; the main process logs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from ..data.tokenize import TokenizedPair
from ..losses.base import AlignmentLoss, preference_metrics
from ..losses.layout import PAIRED
from .batching import collate
from .policy import PolicyModel


@contextmanager
def _same_rng():
    """Whatever scoring draws (nothing in eval mode, but a model may), training's random stream continues as if
    scoring never ran."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield


@torch.no_grad()
def validation_scores(
    policy: PolicyModel,
    loss_fn: AlignmentLoss,
    pairs: Sequence[TokenizedPair],
    pad_token_id: int,
    *,
    max_length: int,
    beta: float,
    progress: float,
    batch_size: int = 8,
    show_bar: bool = False,
) -> dict[str, float]:
    """val/loss, val/pref_accuracy and val/pref_margin of `policy` on validation `pairs` (module docstring).
    `progress` is the schedule position (0..1) the method's loss is evaluated at."""
    if not pairs:
        raise ValueError("validation_scores: no validation pairs to score")
    layout = loss_fn.layout
    examples = layout.examples(_as_data(pairs), max_length)
    device = next(policy.parameters()).device
    n_resp = sum(layout.response_tokens(ex) for ex in examples)
    paired = layout is PAIRED
    was_training = policy.training
    policy.eval()
    loss, acc_sum, margin_sum = 0.0, 0.0, 0.0
    try:
        starts = range(0, len(examples), batch_size)
        for s in tqdm(starts, desc="validation", disable=not show_bar, leave=False):
            chunk = examples[s : s + batch_size]
            w = len(chunk) / len(examples)  # as the engine weights a step's micro-batches (train_step)
            batch = collate(chunk, layout, pad_token_id, packed=False).to(device)
            stats = policy(
                batch, need_reference=loss_fn.needs_reference or paired, need_token_kl=loss_fn.needs_token_kl
            )
            stats.token_denominator = max(n_resp, 1) * w
            batch_loss, _ = loss_fn(stats, progress)
            loss += float(batch_loss) * w
            if paired:  # the same pass holds both responses' log-probs under policy and base
                m = preference_metrics(beta, stats.logps, stats.ref_logps)
                acc_sum += float(m["rewards/accuracies"]) * len(chunk)
                margin_sum += float(m["rewards/margins"]) * len(chunk)
    finally:
        policy.train(was_training)
    if paired:
        accuracy, margin = acc_sum / len(pairs), margin_sum / len(pairs)
    else:
        from ..evaluation.validation import preference_scores

        pref = preference_scores(policy, pairs, pad_token_id, beta=beta, batch_size=batch_size)
        accuracy, margin = pref["rewards/accuracies"], pref["rewards/margins"]
    return {"val/loss": loss, "val/pref_accuracy": accuracy, "val/pref_margin": margin}


def _as_data(pairs: Sequence[TokenizedPair]):
    from ..data.tokenize import TokenizedData

    return TokenizedData(list(pairs))


class ValidationCurve:
    """When to score the validation split during training, and what the run summary says about it."""

    def __init__(
        self, every: int, max_steps: int, pairs: Sequence[TokenizedPair] | None, *, beta: float, batch_size: int
    ):
        self.every, self.max_steps = every, max_steps
        self.pairs = list(pairs or [])
        self.beta, self.batch_size = beta, batch_size
        self.points = 0  # validations run since this process started (a resumed run counts from its restart)
        self.seconds = 0.0  # wall seconds they took (outside gpu_seconds)
        self.last: dict[str, float] = {}

    def due(self, step: int) -> bool:
        """After optimizer step `step` (1-based): every `every` steps and after the last step."""
        return self.every > 0 and (step % self.every == 0 or step == self.max_steps)

    def score(
        self,
        policy: PolicyModel,
        loss_fn: AlignmentLoss,
        pad_token_id: int,
        *,
        step: int,
        max_length: int,
        show_bar: bool,
    ) -> dict[str, float]:
        """The validation metrics after optimizer step `step` (1-based)."""
        t0 = time.perf_counter()
        with _same_rng():
            out = validation_scores(
                policy,
                loss_fn,
                self.pairs,
                pad_token_id,
                max_length=max_length,
                beta=self.beta,
                progress=(step - 1) / max(self.max_steps - 1, 1),  # the position train_step used for this step
                batch_size=self.batch_size,
                show_bar=show_bar,
            )
        self.seconds += time.perf_counter() - t0
        self.points += 1
        self.last = {"step": step, **out}
        return out

    def summary(self) -> dict:
        """What the run did: validation on or off, how often, on how many pairs, at what cost."""
        return {
            "validation": {
                "every": self.every,
                "n_pairs": len(self.pairs),
                "reward_beta": self.beta,
                "points": self.points,
                "seconds": self.seconds,
                "last": self.last or None,
            }
        }
