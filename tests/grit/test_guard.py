"""GRIT never trains as plain AdamW without saying so: too few valid factors after warm-up stop the run with an
error naming the layers, and the run summary records the valid share and the preconditioned/raw gradient ratio."""

from __future__ import annotations

import json
import math

import pytest
import torch
from grit_helpers import batch, make_net, masked_loss

from ecliptica.grit import GritConfig, GritOptimizer
from ecliptica.grit.factors import FactorCollector
from ecliptica.grit.optimizer import GritInactiveError


def _train(opt, net, steps):
    x, w = batch()
    for _ in range(steps):
        masked_loss(net(x), w).backward()
        opt.step()
        opt.zero_grad()


def test_a_tap_that_never_fires_stops_the_run_at_the_guard_step_naming_the_layers():
    """What compiled layers did to the old hooks on the GPU: the factor collection is dropped, every factor stays
    invalid and preconditioning is the identity. Simulated by removing the taps."""
    net = make_net()
    opt = GritOptimizer(net, GritConfig(lr=1e-3, reproject_steps=0))
    opt.collector.remove()
    _train(opt, net, 1)  # step 1 is before the guard: B may still be zero there
    with pytest.raises(GritInactiveError, match=r"0% of the 4 curvature factors expected by step 2 are valid") as e:
        _train(opt, net, 1)
    assert "l1 (a+g: no tokens reached its factor tap)" in str(e.value)
    assert "l2 (a+g: no tokens reached its factor tap)" in str(e.value)


def test_the_guard_passes_a_working_run_and_the_summary_says_what_grit_did():
    net = make_net()
    opt = GritOptimizer(net, GritConfig(lr=1e-3, reproject_steps=0))
    ratios = []
    x, w = batch()
    for _ in range(4):
        masked_loss(net(x), w).backward()
        raw = torch.cat(
            [p.grad.flatten() for layer in opt.layers for p in (layer.lora_A.weight, layer.lora_B.weight)]
        ).norm()
        opt.step()
        ratios.append(opt.metrics()["grit/precond_grad_ratio"])
        # the ratio by hand: the preconditioned LoRA gradients are what the inner optimizer was given
        pre = torch.cat(
            [p.grad.flatten() for layer in opt.layers for p in (layer.lora_A.weight, layer.lora_B.weight)]
        ).norm()
        assert ratios[-1] == pytest.approx(float(pre / raw), rel=1e-4)
        opt.zero_grad()
    grit = opt.summary()["grit"]
    assert grit["active"] and grit["valid_share"] == 1.0 and grit["preconditioned_steps"] == 4
    assert grit["mean_precond_grad_ratio"] == pytest.approx(sum(ratios) / 4, rel=1e-5)
    assert grit["geomean_precond_grad_ratio"] == pytest.approx(math.exp(sum(map(math.log, ratios)) / 4), rel=1e-5)
    assert grit["mean_precond_grad_ratio"] != pytest.approx(1.0, rel=1e-3)  # preconditioning changed the gradient


def test_the_guard_checks_again_later_and_can_be_turned_off():
    net = make_net()
    opt = GritOptimizer(net, GritConfig(lr=1e-3, reproject_steps=0, guard_every=3))
    _train(opt, net, 3)  # checked at step 2: valid
    opt.collector.remove()  # the taps stop firing mid-run; the EMA keeps the old factors valid ...
    for bank in opt.banks:  # ... unless they become unusable, e.g. non-finite
        bank.a_ema.fill_(float("nan"))
    with pytest.raises(GritInactiveError, match="by step 5"):
        _train(opt, net, 2)
    net = make_net()
    off = GritOptimizer(net, GritConfig(lr=1e-3, reproject_steps=0, min_valid_share=0.0))
    off.collector.remove()
    _train(off, net, 4)
    assert off.summary()["grit"]["valid_share"] == 0.0


def test_the_engine_stops_when_the_taps_are_dropped_and_records_grit_in_the_summary(
    tmp_path, tiny_model_dir, monkeypatch
):
    from train_helpers import cita_grit_config

    from ecliptica.train.engine import Trainer

    summary = Trainer(cita_grit_config(tmp_path / "ok", tiny_model_dir, limit=24, lr=5e-3)).setup().train()
    assert summary["grit"]["active"] and summary["grit"]["valid_share"] == 1.0
    assert summary["grit"]["preconditioned_steps"] == summary["steps"]
    on_disk = json.loads((tmp_path / "ok" / "summary.json").read_text())["grit"]
    assert on_disk["valid_share"] == 1.0 and on_disk["mean_precond_grad_ratio"] > 1.0
    metrics = [json.loads(x) for x in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["grit/valid_share"] == 1.0

    monkeypatch.setattr(FactorCollector, "_tap", lambda self, module, inputs, output: None)
    trainer = Trainer(cita_grit_config(tmp_path / "dropped", tiny_model_dir, limit=24, lr=5e-3)).setup()
    with pytest.raises(GritInactiveError, match="self_attn.q_proj"):
        trainer.train()
    assert not (tmp_path / "dropped" / "adapter").exists()  # nothing is written as if GRIT had trained it
