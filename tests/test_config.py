"""Every block of a run config is typed: a typo or an out-of-range value fails when the config loads,
naming the key, instead of being ignored during hours of training."""

import pytest

from ecliptica.config import load_config
from ecliptica.data import format_names


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.dtyp=fp32", "dtyp"),
        ("lora.rank=8", "rank"),
        ("data.max_len=64", "max_len"),
        ("method.lamda_kl=0.1", "lamda_kl"),
        ("optimizer.betas1=0.9", "betas1"),
        ("optimizer.grit={reproject_step: 3}", "reproject_step"),
        ("schedule.warmup=3", "warmup"),
        ("train.max_stepz=3", "max_stepz"),
    ],
)
def test_a_typo_in_any_block_is_an_error_naming_it(override, key):
    section = override.split(".")[0]
    grit = ["optimizer.name=grit"] if "grit" in override else []
    with pytest.raises(ValueError, match=rf"{section}\..*{key}"):
        load_config(None, [*grit, override])


@pytest.mark.parametrize(
    "override, key",
    [
        ("optimizer.grit={ema_decay: 1.0}", "ema_decay"),
        ("optimizer.grit={min_rank: 0}", "min_rank"),
        ("method.lambda_kl=-0.1", "lambda_kl"),
        ("method.kl=seq_logratio", "unbounded"),
        ("data.format=hh_rlhf", "format"),
    ],
)
def test_out_of_range_settings_fail_at_load(override, key):
    with pytest.raises(ValueError, match=key):
        load_config(None, ["optimizer.name=grit", override])


def test_grit_settings_need_the_grit_optimizer():
    with pytest.raises(ValueError, match="optimizer.name is not 'grit'"):
        load_config(None, ["optimizer.grit={reproject_steps: 3}"])
    cfg = load_config(None, ["optimizer.name=grit", "optimizer.lr=3e-4", "optimizer.grit={reproject_steps: 3}"])
    g = cfg.optimizer.grit_config()  # the inner optimizer takes the section's lr unless the grit block sets one
    assert (g.lr, g.reproject_steps, g.reproject_warmup) == (3e-4, 3, 100)


def test_format_lists_come_from_the_registered_formats():
    from ecliptica.evaluation.config import EvalDataSection
    from ecliptica.evaluation.prompts import EVAL_FORMATS

    assert (
        EVAL_FORMATS
        == format_names("prompt")
        == (
            "litmus",
            "xstest",
            "donotanswer",
            "strongreject",
            "advbench",
            "benign",
            "generic",
        )
    )
    assert "generic-prompts" not in format_names()
    for fmt in format_names("prompt"):
        assert EvalDataSection(format=fmt, benign_format=fmt).format == fmt
    for fmt in format_names("preference"):
        assert load_config(None, [f"data.format={fmt}"]).data.format == fmt
    with pytest.raises(ValueError):
        EvalDataSection(format="hh-rlhf")  # a preference format holds no evaluation prompts


def test_a_setting_added_later_leaves_the_fingerprint_alone_at_its_default():
    """A run or study begun before train.fused_lora, train.nf4_kernel and train.val_* existed, and while train.logp_chunk_size's
    default was 1024, keeps its hash: the hash of the config as that version dumped it."""
    import hashlib
    import json

    from ecliptica.config import TrainConfig

    cfg = TrainConfig.model_validate({"model": {"name": "x"}})
    before = cfg.model_dump(mode="json")
    del before["train"]["fused_lora"], before["train"]["nf4_kernel"]  # the dump before these settings existed
    del before["train"]["val_every"], before["train"]["val_reward_beta"], before["train"]["val_batch_size"]
    assert before["train"]["logp_chunk_size"] == 256
    before["train"]["logp_chunk_size"] = 1024  # ... and before the default changed
    by_hand = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert cfg.hash() == by_hand
    # a non-default value is part of the fingerprint
    assert TrainConfig.model_validate({"model": {"name": "x"}, "train": {"fused_lora": "off"}}).hash() != by_hand
    other = TrainConfig.model_validate({"model": {"name": "x"}, "train": {"nf4_kernel": "bitsandbytes"}})
    assert other.hash() != by_hand
    assert TrainConfig.model_validate({"model": {"name": "x"}, "train": {"logp_chunk_size": 512}}).hash() != by_hand
    validated = {"model": {"name": "x"}, "train": {"val_every": 5}, "data": {"val_fraction": 0.1}}
    assert TrainConfig.model_validate(validated).hash() != TrainConfig.model_validate({**validated, "train": {}}).hash()
