import copy

import pytest
import torch
from grit_helpers import MiniLoraLinear, batch, factors, make_net, masked_loss

from ecliptica.grit import GritConfig, GritOptimizer

NO_REPROJ = dict(reproject_steps=0)


@pytest.mark.parametrize("convention", ["kfac", "paper"])
def test_closed_form_matches_dense_factors(convention):
    torch.manual_seed(0)
    layer = MiniLoraLinear(6, 5, r=3, scaling=1.5)
    lam = 0.1
    opt = GritOptimizer(
        layer, GritConfig(inner="sgd", lr=0.0, damping=lam, damping_mode="absolute", convention=convention, **NO_REPROJ)
    )
    x = torch.randn(2, 4, 6)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    y = layer(x)
    gy = torch.randn_like(y)  # arbitrary output gradient
    opt.set_token_mask(mask)
    y = layer(x)
    (y * gy).sum().backward()
    A = layer.lora_A["default"].weight.detach()
    B = layer.lora_B["default"].weight.detach()
    gA = layer.lora_A["default"].weight.grad.clone()
    gB = layer.lora_B["default"].weight.grad.clone()
    opt.step()

    keep = mask.reshape(-1)
    u = (x.reshape(-1, 6) @ A.T)[keep]  # rank-space input to B
    v = (1.5 * gy.reshape(-1, 5) @ B)[keep]  # gradient w.r.t. u
    n = keep.sum()
    sig_a, sig_g = u.T @ u / n, v.T @ v / n
    eye = torch.eye(3)
    fb, fa = (sig_a, sig_g) if convention == "kfac" else (sig_g, sig_a)
    expect_B = gB @ torch.linalg.inv(fb + lam * eye)
    expect_A = torch.linalg.inv(fa + lam * eye) @ gA
    got_a, got_g = factors(opt)
    torch.testing.assert_close(got_a[0], sig_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_g[0], sig_g, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, expect_B, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, expect_A, rtol=1e-4, atol=1e-6)


def test_logged_damping_and_gradient_ratio_by_hand():
    # relative damping: each factor gets 1e-3 x its mean eigenvalue (trace / r); the log shows their mean
    torch.manual_seed(0)
    layer = MiniLoraLinear(6, 5, r=3, scaling=1.5)
    opt = GritOptimizer(layer, GritConfig(inner="sgd", lr=0.0, damping=1e-3, damping_mode="relative", **NO_REPROJ))
    x = torch.randn(2, 4, 6)
    y = layer(x)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    A = layer.lora_A["default"].weight.detach()
    B = layer.lora_B["default"].weight.detach()
    raw = torch.cat([layer.lora_A["default"].weight.grad.flatten(), layer.lora_B["default"].weight.grad.flatten()])
    opt.step()
    u = x.reshape(-1, 6) @ A.T
    v = 1.5 * gy.reshape(-1, 5) @ B
    sig_a, sig_g = u.T @ u / 8, v.T @ v / 8
    d_a, d_g = 1e-3 * torch.trace(sig_a) / 3, 1e-3 * torch.trace(sig_g) / 3
    pre = torch.cat([layer.lora_A["default"].weight.grad.flatten(), layer.lora_B["default"].weight.grad.flatten()])
    m = opt.metrics()
    assert m["grit/damping"] == pytest.approx(float(d_a + d_g) / 2, rel=1e-5)
    assert m["grit/damping_escalations"] == 0.0
    assert m["grit/precond_grad_ratio"] == pytest.approx(float(pre.norm() / raw.norm()), rel=1e-5)
    assert m["grit/effective_rank"] == 3.0


def _identity_factors(opt):
    for bank in opt.banks:
        bank.a_ema.copy_(torch.eye(bank.r).expand_as(bank.a_ema))
        bank.g_ema.copy_(torch.eye(bank.r).expand_as(bank.g_ema))
        bank.initialized.fill_(True)
    opt.collector.enabled = False  # keep the identity factors: no new sums
    opt._update_factors()


@pytest.mark.parametrize("inner", ["adamw", "sgd"])
def test_identity_factors_zero_damping_equal_inner_step(inner):
    net = make_net()
    ref = copy.deepcopy(net)
    cfg = GritConfig(inner=inner, lr=1e-2, momentum=0.9 if inner == "sgd" else 0.0, damping=0.0, **NO_REPROJ)
    opt = GritOptimizer(net, cfg)
    params = [p for p in ref.parameters() if p.requires_grad]
    ref_opt = (
        torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
        if inner == "adamw"
        else torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    )
    x, w = batch()
    _identity_factors(opt)
    for _ in range(3):
        for model, o in ((net, opt), (ref, ref_opt)):
            masked_loss(model(x), w).backward()
            o.step()
            o.zero_grad()
        opt.collector.enabled = False
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert opt.metrics()["grit/inversions"] >= 1


def test_differs_from_adamw_and_metrics_count_events():
    net = make_net()
    ref = copy.deepcopy(net)
    opt = GritOptimizer(
        net, GritConfig(lr=1e-2, reproject_steps=2, reproject_warmup=0, rank_adaptation=False, reproject_rank=2)
    )
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    x, w = batch()
    history = []
    for step in range(5):
        for model, o in ((net, opt), (ref, ref_opt)):
            masked_loss(model(x), w).backward()
            o.step()
            o.zero_grad()
        m = opt.metrics()
        history.append((m["grit/inversions"], m["grit/reprojections"]))
        if step == 0:
            a, a_ref = net.l1.lora_A["default"].weight, ref.l1.lora_A["default"].weight
            assert not torch.allclose(a, a_ref)
            torch.testing.assert_close(net.head.weight, ref.head.weight)  # non-LoRA: plain AdamW
    assert history == [(1, 0), (2, 1), (3, 1), (4, 2), (5, 2)]
    m = opt.metrics()
    for key in (
        "grit/factor_updates",
        "grit/damping",
        "grit/damping_escalations",
        "grit/effective_rank",
        "grit/precond_grad_ratio",
        "grit/effective_rank/l1",
        "grit/reprojection_loss_delta",
    ):
        assert key in m
    assert m["grit/effective_rank"] == 2.0


def test_factor_update_steps_and_precondition_warmup():
    net = make_net()
    opt = GritOptimizer(net, GritConfig(factor_update_steps=2, precondition_warmup=3, **NO_REPROJ))
    x, w = batch()
    for _ in range(4):
        masked_loss(net(x), w).backward()
        opt.step()
        opt.zero_grad()
    assert opt.metrics()["grit/factor_updates"] == 2  # steps 0 and 2
    assert "grit/precond_grad_ratio" in opt.metrics()  # preconditioned at step 3


def test_cholesky_escalation_on_indefinite_factor():
    from ecliptica.grit.precondition import damped_cholesky

    sigma = torch.stack([torch.eye(3), torch.diag(torch.tensor([1.0, 1.0, -0.05]))])
    chol, valid, damp, esc = damped_cholesky(sigma, torch.tensor([True, True]), 1e-3, "absolute", 4)
    assert valid.all()
    assert esc.tolist() == [0.0, 2.0]  # 1e-3 and 1e-2 fail, 1e-1 works
    torch.testing.assert_close(damp, torch.tensor([1e-3, 1e-1]))
    torch.testing.assert_close(chol[1] @ chol[1].T, sigma[1] + 0.1 * torch.eye(3))


def test_relative_damping_and_zero_factor_is_identity():
    from ecliptica.grit.precondition import damped_cholesky

    sigma = torch.stack([2.0 * torch.eye(2), torch.zeros(2, 2)])
    chol, valid, damp, _ = damped_cholesky(sigma, torch.tensor([True, True]), 0.5, "relative", 3)
    assert valid.tolist() == [True, False]
    torch.testing.assert_close(damp, torch.tensor([1.0, 0.0]))  # 0.5 * trace/r
    torch.testing.assert_close(chol[1], torch.eye(2))
