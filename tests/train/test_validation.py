"""The validation curve (train/validation.py): its numbers against a hand computation from plain HF forwards, and
training with it trains exactly the weights training without it does."""

import json

import pytest
import torch
import torch.nn.functional as F
from train_helpers import dense_token_logps, tiny_peft, toy_pairs

from ecliptica.config import TrainConfig
from ecliptica.losses import build_loss
from ecliptica.losses.dpo import DPOConfig
from ecliptica.losses.sft import SFTConfig
from ecliptica.train import Trainer
from ecliptica.train.policy import PolicyModel
from ecliptica.train.validation import validation_scores


def _hand(peft_model, pairs):
    """Per pair: (policy - base) log-ratio of chosen and rejected, and the chosen tokens' log-probs, from one
    unpadded HF forward per sequence (train_helpers.dense_token_logps), the adapter on and off."""
    with torch.no_grad():
        pol = dense_token_logps(peft_model, pairs)
        with peft_model.disable_adapter():
            ref = dense_token_logps(peft_model, pairs)
    seq = lambda rows: torch.stack([lp.gather(-1, t[:, None]).sum() for lp, t in rows])  # noqa: E731
    n = len(pairs)
    ratio = seq(pol) - seq(ref)
    chosen_tokens = torch.cat([lp.gather(-1, t[:, None]).squeeze(-1) for lp, t in pol[:n]])
    return ratio[:n], ratio[n:], chosen_tokens


@pytest.mark.parametrize("batch_size", [2, 8])  # uneven batches (2, 2, 1) and one batch give the same numbers
def test_dpo_scores_match_a_hand_computation(tiny_model_dir, batch_size):
    peft = tiny_peft(tiny_model_dir)
    pairs = toy_pairs(5)
    rc, rr, _ = _hand(peft, pairs)
    beta_loss, beta_val = 0.3, 0.1
    out = validation_scores(
        PolicyModel(peft),
        build_loss(DPOConfig(beta=beta_loss)),
        pairs,
        2,
        max_length=64,
        beta=beta_val,
        progress=0.0,
        batch_size=batch_size,
    )
    z = rc - rr
    assert 0 < float((z > 0).float().mean()) < 1  # the control below can tell a flipped preference apart
    assert out["val/loss"] == pytest.approx(float(-F.logsigmoid(beta_loss * z).mean()), rel=1e-5)
    assert out["val/pref_accuracy"] == pytest.approx(float((z > 0).float().mean()))
    assert out["val/pref_margin"] == pytest.approx(float(beta_val * z.mean()), rel=1e-5)

    # negative control: the same pairs with chosen and rejected swapped flip every preference
    swapped = [type(p)(p.prompt_ids, p.rejected_ids, p.chosen_ids, p.row_id) for p in pairs]
    flipped = validation_scores(
        PolicyModel(peft), build_loss(DPOConfig(beta=beta_loss)), swapped, 2, max_length=64, beta=beta_val, progress=0.0
    )
    assert flipped["val/pref_accuracy"] == pytest.approx(1 - out["val/pref_accuracy"])
    assert flipped["val/pref_margin"] == pytest.approx(-out["val/pref_margin"], rel=1e-5)


def test_sft_scores_match_a_hand_computation(tiny_model_dir):
    """SFT trains on chosen responses only: its loss is the token-mean NLL over every chosen token of the split, and its
    accuracy comes from the paired scorer at the fixed beta."""
    peft = tiny_peft(tiny_model_dir)
    pairs = toy_pairs(5)
    rc, rr, chosen_tokens = _hand(peft, pairs)
    out = validation_scores(
        PolicyModel(peft), build_loss(SFTConfig()), pairs, 2, max_length=64, beta=0.1, progress=0.0, batch_size=2
    )
    assert out["val/loss"] == pytest.approx(float(-chosen_tokens.mean()), rel=1e-5)
    assert out["val/pref_accuracy"] == pytest.approx(float((rc > rr).float().mean()))
    assert out["val/pref_margin"] == pytest.approx(float(0.1 * (rc - rr).mean()), rel=1e-5)


def test_an_untrained_adapter_scores_zero_accuracy_and_log2(tiny_model_dir):
    """Negative control: B = 0 makes the policy its own base, so every implicit reward is 0: no pair is won (strict >)
    and the DPO loss is exactly log 2."""
    peft = tiny_peft(tiny_model_dir, randomize_b=False)
    out = validation_scores(
        PolicyModel(peft), build_loss(DPOConfig()), toy_pairs(4), 2, max_length=64, beta=0.1, progress=0.0
    )
    assert out["val/pref_accuracy"] == 0.0
    assert out["val/loss"] == pytest.approx(0.693147, abs=1e-6)


def _cfg(run_dir, model_dir, method, val_every):
    return TrainConfig.model_validate(
        {
            "run_dir": str(run_dir),
            "seed": 5,
            "model": {"name": str(model_dir)},
            # dropout draws from the RNG every step: scoring that drew from it too would change the next step
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
            "method": {"name": method},
            "data": {"limit": 24, "val_fraction": 0.25, "max_length": 160, "max_prompt_length": 96},
            "optimizer": {"lr": 5e-3},
            "train": {
                "max_steps": 5,
                "micro_batch_size": 2,
                "grad_accum": 2,
                "progress": False,
                "val_every": val_every,
                "log_every": 2,
            },
        }
    )


def test_validation_leaves_training_unchanged_and_logs_the_curve(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = {}
    for every in (0, 2):
        run = tmp_path / f"v{every}"
        summary = Trainer(_cfg(run, tiny_model_dir, "dpo", every)).setup().train()
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        runs[every] = (load_file(str(run / "adapter" / "adapter_model.safetensors")), lines, summary)
    off, on = runs[0], runs[2]
    assert off[0].keys() == on[0].keys()
    assert all(torch.equal(off[0][k], on[0][k]) for k in off[0])  # the same weights, bit for bit
    by_step = {x["step"]: x for x in on[1]}
    assert [x["step"] for x in off[1]] == [2, 4, 5]
    assert sorted(by_step) == [2, 4, 5]  # every 2 steps and after the last (log_every 2 also logs 2, 4, 5)
    assert [by_step[s]["loss"] for s in (2, 4, 5)] == [x["loss"] for x in off[1]]
    for s in (2, 4, 5):
        assert 0.0 <= by_step[s]["val/pref_accuracy"] <= 1.0 and by_step[s]["val/loss"] > 0
    assert not any("val/loss" in x for x in off[1])
    # gpu_seconds counts the optimizer steps' wall time only: it grows with steps and stays within the run's total
    assert 0 < by_step[2]["gpu_seconds"] < by_step[4]["gpu_seconds"] <= by_step[5]["gpu_seconds"]
    assert by_step[5]["gpu_seconds"] == pytest.approx(on[2]["train_seconds"])
    v = on[2]["validation"]
    assert (v["every"], v["points"], v["last"]["step"]) == (2, 3, 5)
    assert (
        v["n_pairs"]
        == on[2]["data"]["val_pairs"]
        == len(json.loads((tmp_path / "v2" / "split.json").read_text())["val"])
    )
    assert off[2]["validation"]["points"] == 0
    tags = set()
    for events in (tmp_path / "v2" / "tb").rglob("events.out.tfevents.*"):
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert {"val/pref_accuracy", "val/loss", "gpu_seconds"} <= tags


def test_val_every_needs_a_validation_split(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, "dpo", 2).model_dump(mode="json")
    cfg["data"]["val_fraction"] = 0.0
    with pytest.raises(ValueError, match=r"train.val_every: 2 .*data.val_fraction is 0"):
        TrainConfig.model_validate(cfg)
