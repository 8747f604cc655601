"""QLoRA's storage dtype: bf16 (shardable by FSDP2) under an FSDP launch, uint8 otherwise, or as configured."""

import pytest
import torch

from ecliptica.config import TrainConfig
from ecliptica.models import quant_storage


def test_auto_follows_the_fsdp_launch(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert quant_storage("auto") is torch.uint8
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for distributed_type: FSDP
    assert quant_storage("auto") is torch.bfloat16
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert quant_storage("auto") is torch.uint8


def test_explicit_settings_win_and_typos_fail(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert quant_storage("uint8") is torch.uint8 and quant_storage("bf16") is torch.bfloat16
    assert TrainConfig.model_validate({"model": {"quant_storage": "bf16"}}).model.quant_storage == "bf16"
    with pytest.raises(ValueError, match="quant_storage"):
        TrainConfig.model_validate({"model": {"quant_storage": "int4"}})
