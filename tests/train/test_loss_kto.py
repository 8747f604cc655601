"""KTO against TRL's KTOTrainer on the same model and token ids, a closed form, and through the engine."""

import json
import math

import pytest
import torch
from train_helpers import LORA_TARGETS, dense_token_logps, randomize_lora_b, toy_pairs

from ecliptica.data import TokenizedData, TokenizedPair
from ecliptica.losses.base import SequenceStats
from ecliptica.losses.kto import KTOConfig, KTOLoss
from ecliptica.losses.layout import UNPAIRED
from ecliptica.train.batching import collate
from ecliptica.train.policy import PolicyModel


def trl_kto(model_dir, out_dir, examples, **kto_args):
    """TRL's KTOTrainer loss and logged KL on our unpaired examples as one batch (their completions, mismatched
    completions and labels), and the LoRA model it used: TRL creates the adapter, so its reference is the disabled
    adapter, as ours is; the B matrices are randomised so the policy differs from the reference."""
    datasets = pytest.importorskip("datasets")
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig as TRLKTOConfig
    from trl import KTOTrainer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=LORA_TARGETS)
    rows = [{"prompt": "a", "completion": "b", "label": k % 2 == 0} for k in range(4)]  # TRL wants a dataset
    args = TRLKTOConfig(
        output_dir=str(out_dir), report_to="none", use_cpu=True, per_device_train_batch_size=2, **kto_args
    )
    trainer = KTOTrainer(
        model=base, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok, peft_config=lora
    )
    randomize_lora_b(trainer.model, 1)
    trainer.model.eval()
    batch = [
        {
            "prompt_ids": list(e.prompt_ids),
            "completion_ids": list(e.completion_ids),
            "KL_completion_ids": list(e.mismatched_ids),
            "label": e.desirable,
        }
        for e in examples
    ]
    inputs = DataCollatorForUnpairedPreference(pad_token_id=2)(batch)
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    return float(loss), trainer._metrics["eval"], trainer.model


def _ours(model, examples, cfg):
    with torch.no_grad():
        s = PolicyModel(model, chunk_size=7)(collate(examples, UNPAIRED, pad_id=2), need_reference=True)
        loss, m = KTOLoss(cfg)(s)
    return float(loss), m, s


@pytest.mark.parametrize("seed", [0, 9])  # seed 0: the KL estimate is clamped at 0; seed 9: it is positive
def test_kto_matches_trl(tiny_model_dir, tmp_path, seed):
    """Same model, same token ids: 3 pairs unpaired into 6 examples (3 desirable, 3 undesirable) with their
    mismatched completions, in one batch; TRL 1.16's loss and KL and ours agree to 1e-5."""
    examples = UNPAIRED.examples(TokenizedData(toy_pairs(3, seed=seed)), max_length=64)
    kto = {"beta": 0.3, "desirable_weight": 1.5, "undesirable_weight": 0.7}
    trl_loss, trl_metrics, model = trl_kto(tiny_model_dir, tmp_path, examples, **kto)
    ours, m, s = _ours(model, examples, KTOConfig(**kto))
    assert float(m["kl"]) == pytest.approx(trl_metrics["kl"][-1], abs=1e-5)
    assert ours == pytest.approx(trl_loss, abs=1e-5)
    assert trl_loss != pytest.approx(0.5 * (1.5 + 0.7) / 2, abs=1e-3)  # policy != reference: a real comparison
    logps, _ = UNPAIRED.split(s.logps)
    desirable = s.labels
    assert float(m["logps/chosen"].num / m["logps/chosen"].den) == pytest.approx(
        trl_metrics["logps/chosen"][-1], abs=1e-4
    )
    rejected = m["rewards/rejected"]
    assert float(rejected.num / rejected.den) == pytest.approx(trl_metrics["rewards/rejected"][-1], abs=1e-5)
    assert desirable.tolist() == [True] * 3 + [False] * 3 and logps.shape == (6,)
    mismatched, ref_mismatched = UNPAIRED.split(s.logps)[1], UNPAIRED.split(s.ref_logps)[1]
    raw = float((mismatched - ref_mismatched).mean())
    assert (raw < 0) == (seed == 0)  # each case really takes its branch of the clamp
    if raw > 0:  # negative control: the loss without the reference point differs from TRL's
        r = UNPAIRED.split(s.logps - s.ref_logps)[0]
        plain = torch.where(desirable, 1.5 * (1 - torch.sigmoid(0.3 * r)), 0.7 * (1 - torch.sigmoid(-0.3 * r)))
        assert float(plain.mean()) != pytest.approx(trl_loss, abs=1e-4)


def test_kto_closed_form_clamp_and_detached_reference_point():
    beta, wd, wu = 0.5, 2.0, 1.0
    # examples: desirable, undesirable; their completions then their mismatched completions
    logps = torch.tensor([-2.0, -3.0, -4.0, -5.0], requires_grad=True)
    ref = torch.tensor([-3.0, -2.0, -4.5, -5.5])
    s = SequenceStats(logps, torch.ones(4, dtype=torch.long), ref, labels=torch.tensor([True, False]))
    loss, m = KTOLoss(KTOConfig(beta=beta, desirable_weight=wd, undesirable_weight=wu))(s)
    z0 = ((-4.0 + 4.5) + (-5.0 + 5.5)) / 2  # 0.5
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = (wd * (1 - sig(beta * (1.0 - z0))) + wu * (1 - sig(beta * (z0 - (-1.0))))) / 2
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert float(m["kl"]) == pytest.approx(z0)
    loss.backward()
    assert logps.grad[2:].abs().sum() == 0  # no gradient through the reference point
    assert float(m["rewards/chosen"].num / m["rewards/chosen"].den) == pytest.approx(beta * 1.0)
    assert float(m["rewards/rejected"].num / m["rewards/rejected"].den) == pytest.approx(beta * -1.0)
    # mismatched completions more likely under the reference: the estimate is clamped at 0
    s = SequenceStats(
        logps.detach(),
        torch.ones(4, dtype=torch.long),
        torch.tensor([-3.0, -2.0, -3.0, -4.0]),
        labels=torch.tensor([True, False]),
    )
    loss, m = KTOLoss(KTOConfig(beta=beta, desirable_weight=wd, undesirable_weight=wu))(s)
    assert float(m["kl"]) == 0.0
    assert float(loss) == pytest.approx(
        (wd * (1 - sig(beta * 1.0)) + wu * (1 - sig(beta * (0 - (-1.0))))) / 2, abs=1e-6
    )
    with pytest.raises(ValueError, match="desirable_weight"):
        KTOConfig(desirable_weight=-1.0)


def _kto_config(run_dir, model_dir, seed=3, **train):
    from ecliptica.config import TrainConfig

    return TrainConfig.model_validate(
        {
            "run_dir": str(run_dir),
            "seed": seed,
            "model": {"name": str(model_dir)},
            "lora": {"r": 4, "alpha": 8},
            "method": {"name": "kto"},
            "data": {"limit": 24, "max_length": 160, "max_prompt_length": 96},
            "optimizer": {"lr": 5e-3},
            "train": {"max_steps": 1, "micro_batch_size": 2, "grad_accum": 4, "progress": False, **train},
        }
    )


def test_kto_step_metrics_are_means_over_the_step_examples_of_each_kind(tmp_path, tiny_model_dir):
    """Step 1 (zero adapter: policy = reference): the loss is 1 - sigma(0) = 0.5, and logps/chosen|rejected are the
    means over the step's desirable|undesirable examples of dense log-probs, though some micro-batch lacks a kind."""
    from ecliptica.train import Trainer

    tr = Trainer(_kto_config(tmp_path / "run", tiny_model_dir, seed=4)).setup()
    assert tr.micro_batches.tokens is None  # never re-split by tokens
    groups = tr.step_micro_batches(0)
    assert [len(g) for g in groups] == [2, 2, 2, 2]
    step = [tr.examples[i] for g in groups for i in g]
    kinds = [{tr.examples[i].desirable for i in g} for g in groups]
    assert any(len(k) == 1 for k in kinds) and any(len(k) == 2 for k in kinds), kinds  # a real test of the Ratio
    with torch.no_grad():
        pairs = [TokenizedPair(e.prompt_ids, e.completion_ids, ()) for e in step]
        dense = [
            float(lp.gather(-1, t[:, None]).sum())
            for lp, t in dense_token_logps(tr.peft_model, pairs, with_rejected=False)
        ]
    want = {
        k: sum(lp for lp, e in zip(dense, step) if e.desirable == k) / sum(e.desirable == k for e in step)
        for k in (True, False)
    }
    tr.train()
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["loss"] == pytest.approx(0.5, abs=1e-6) and line["kl"] == pytest.approx(0.0, abs=1e-5)
    assert line["logps/chosen"] == pytest.approx(want[True], rel=1e-5)
    assert line["logps/rejected"] == pytest.approx(want[False], rel=1e-5)
    assert line["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert line["rewards/rejected"] == pytest.approx(0.0, abs=1e-5)


def test_kto_precomputed_reference_matches_online(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("ECLIPTICA_CACHE", str(tmp_path / "cache"))
    from ecliptica.train import Trainer

    losses = {}
    for name in ("online", "cached"):
        cfg = _kto_config(tmp_path / name, tiny_model_dir, max_steps=3, grad_accum=2)
        cfg.method.precompute_reference = name == "cached"
        tr = Trainer(cfg).setup()
        if name == "cached":
            assert tr.ref_cache.shape == (len(tr.examples), 2) == (2 * len(tr.data.pairs), 2)
        tr.train()
        losses[name] = [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert losses["cached"] == pytest.approx(losses["online"], rel=1e-4)
    assert losses["online"][0] == pytest.approx(0.5, abs=1e-6) and losses["online"][-1] != pytest.approx(0.5)
