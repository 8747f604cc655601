"""The method registry: one list of methods drives the config union, the CLI, the study's arms, and every
registered method trains through the one engine."""

import json

import pytest

from ecliptica.config import TrainConfig, load_config
from ecliptica.losses import registry


def test_every_method_module_is_registered_in_display_order():
    assert registry.method_names()[:3] == ("sft", "dpo", "cita")  # the study's table order
    assert {"ipo", "simpo", "orpo", "kto"} <= set(registry.method_names())  # found by discovery, listed nowhere
    for name, cls in registry.METHODS.items():
        assert cls.name == name == cls.config().name
        assert type(registry.build_loss(cls.config())) is cls
        cfg = TrainConfig(method=cls.config())  # the saved, resolved config loads back as the same config
        assert TrainConfig.model_validate(cfg.model_dump(mode="json")) == cfg


def test_config_union_picks_the_method_by_name_and_forbids_other_methods_settings():
    assert type(load_config(None, ["method.name=simpo"]).method).__name__ == "SimPOConfig"
    assert load_config(None, ["method.beta=0.3"]).method.name == "cita"  # no name: the default method
    with pytest.raises(ValueError, match="lambda_kl"):  # CITA's setting is not DPO's
        load_config(None, ["method.name=dpo", "method.lambda_kl=0.1"])
    with pytest.raises(ValueError, match="'sft', 'dpo', 'cita'"):
        load_config(None, ["method.name=ppo"])


@pytest.mark.parametrize("name", [n for n, c in registry.METHODS.items() if "beta" in c.config.model_fields])
def test_beta_must_be_positive(name):
    with pytest.raises(ValueError, match="beta"):
        load_config(None, [f"method.name={name}", "method.beta=0"])


def test_cli_and_study_read_the_registry():
    from ecliptica.cli import build_parser
    from ecliptica.study.config import ArmSpec

    preview = ["data", "preview", "demo:preferences", "--format", "generic", "--method"]
    for name in registry.method_names():
        assert build_parser().parse_args([*preview, name]).method == name
        assert ArmSpec(name=name, method=name).method == name
    with pytest.raises(SystemExit):
        build_parser().parse_args([*preview, "ppo"])
    with pytest.raises(ValueError, match="baseline"):
        ArmSpec(name="x", method="ppo")


def test_shared_method_block_gives_each_method_its_own_settings():
    shared = {"beta": 0.2, "lambda_kl": 0.05, "kl": "token_kl"}
    assert registry.settings_for("sft", shared) == {}
    assert registry.settings_for("dpo", shared) == {"beta": 0.2}
    assert registry.settings_for("cita", shared) == shared
    with pytest.raises(ValueError, match="lamda_kl"):
        registry.settings_for("cita", {"lamda_kl": 0.05})


@pytest.mark.parametrize("method", registry.method_names())
def test_every_registered_method_trains_in_the_engine(tmp_path, tiny_model_dir, method):
    from ecliptica.train import Trainer

    cfg = TrainConfig.model_validate(
        {
            "run_dir": str(tmp_path / "run"),
            "model": {"name": str(tiny_model_dir)},
            "lora": {"r": 4, "alpha": 8},
            "method": {"name": method},
            "data": {"limit": 8, "max_length": 128, "max_prompt_length": 64},
            "optimizer": {"lr": 5e-3},
            "train": {"max_steps": 2, "micro_batch_size": 2, "grad_accum": 1, "progress": False},
        }
    )
    summary = Trainer(cfg).setup().train()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["method"] == method and [x["step"] for x in lines] == [1, 2]
    assert all(x["grad_norm"] > 0 for x in lines)  # the loss reaches the adapter
    if method == "ipo":  # zero adapter at step 1: policy == reference, so the loss is (1 / (2 beta))^2
        assert lines[0]["loss"] == pytest.approx((1 / (2 * cfg.method.beta)) ** 2, rel=1e-5)
    if method == "kto":  # zero adapter at step 1: every log-ratio and the KL estimate are 0, so 1 - sigma(0)
        assert lines[0]["loss"] == pytest.approx(0.5, rel=1e-5)
