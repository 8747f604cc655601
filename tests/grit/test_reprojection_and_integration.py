import copy

import pytest
import torch
from grit_helpers import batch, make_net, masked_loss

from ecliptica.grit import GritConfig, GritOptimizer, parameter_counts


def _lora_pairs(net):
    return [(m.lora_B["default"].weight, m.lora_A["default"].weight) for m in (net.l1, net.l2)]


@pytest.mark.parametrize("sides", ["two", "one"])
def test_reprojection_bounds_rank_and_logs_small_loss_change(sides):
    net = make_net(r=4)
    # lr = 0: the only parameter change of the step is the reprojection itself.
    opt = GritOptimizer(
        net,
        GritConfig(
            lr=0.0,
            reproject_steps=1,
            reproject_warmup=0,
            rank_adaptation=False,
            reproject_rank=2,
            reproject_sides=sides,
        ),
    )
    x, w = batch()
    before_state = {n: t.clone() for n, t in net.state_dict().items()}
    loss0 = masked_loss(net(x), w)
    loss0.backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        loss1 = masked_loss(net(x), w)
    del loss1
    for b, a in _lora_pairs(net):
        assert torch.linalg.matrix_rank(b @ a) <= 2
    m = opt.metrics()
    assert m["grit/reprojections"] == 1 and m["grit/effective_rank"] == 2
    assert "grit/reprojection_rel_change" in m
    assert torch.isfinite(torch.tensor(m["grit/reprojection_loss_delta"]))
    counts = opt.parameter_counts()
    assert counts["effective"] == counts["physical"] // 2
    assert parameter_counts(net, opt.effective_ranks()) == counts
    net.load_state_dict(before_state)


def test_rank_adaptation_keeps_energy_and_loss_change_is_small():
    net = make_net(r=4)
    opt = GritOptimizer(
        net,
        GritConfig(
            lr=0.0, reproject_steps=1, reproject_warmup=0, rank_adaptation=True, energy_threshold=0.99, min_rank=1
        ),
    )
    x, _ = batch()
    x = x * torch.tensor([3.0, 1.0, 0.1, 0.05, 0.02, 0.01])  # anisotropic inputs: decaying spectrum
    target = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(5))
    loss0 = (net(x) - target).square().mean()
    loss0.backward()
    opt.step()
    with torch.no_grad():
        loss1 = (net(x) - target).square().mean()
    bank = opt.banks[0]
    evals = torch.linalg.eigvalsh(bank.a_ema).flip(-1)
    frac = evals.cumsum(-1) / evals.sum(-1, keepdim=True)
    for i, k in enumerate(bank.ranks.tolist()):
        assert frac[i, k - 1] >= 0.99 - 1e-6 and (k == 1 or frac[i, k - 2] < 0.99)
    assert bank.ranks.sum() < 2 * 4  # something was cut
    actual = float(loss1 - loss0.detach())
    assert abs(actual) < 0.02 * float(loss0.detach())
    # Logged: a first-order estimate (<grad, delta>) and the relative change of BA.
    m = opt.metrics()
    assert abs(m["grit/reprojection_loss_delta"]) < 0.1 * float(loss0.detach())
    assert 0 < m["grit/reprojection_rel_change"] < 0.5


def test_reprojection_projects_first_moment_keeps_second():
    net = make_net(r=4)
    opt = GritOptimizer(
        net, GritConfig(lr=1e-2, reproject_steps=2, reproject_warmup=0, rank_adaptation=False, reproject_rank=2)
    )
    x, w = batch()
    a = net.l1.lora_A["default"].weight
    for step in range(2):
        masked_loss(net(x), w).backward()
        if step == 1:
            # Replay step 2 without GRIT's reprojection to get the pre-projection moments.
            shadow = copy.deepcopy(opt.inner.state[a])
        opt.step()
        opt.zero_grad()
    p_a = opt.banks[0].proj_a[0]
    state = opt.inner.state[a]
    assert torch.linalg.matrix_rank(state["exp_avg"]) <= 2
    assert torch.allclose(p_a @ state["exp_avg"], state["exp_avg"], atol=1e-6)
    assert not torch.equal(state["exp_avg_sq"], shadow["exp_avg_sq"])  # still updated normally


def _run(net, opt, steps, seed0):
    for s in range(steps):
        x, w = batch(seed=seed0 + s)
        mask = torch.ones(4, 5, dtype=torch.bool)
        mask[s % 4, 3:] = False
        opt.set_token_mask(mask)
        masked_loss(net(x), w, mask).backward()
        opt.step()
        opt.zero_grad()


def test_state_dict_round_trip_gives_identical_steps():
    cfg = GritConfig(
        lr=1e-2,
        reproject_steps=2,
        reproject_warmup=0,
        factor_update_steps=2,
        rank_adaptation=True,
        min_rank=1,
        energy_threshold=0.95,
    )
    net = make_net()
    opt = GritOptimizer(net, cfg)
    _run(net, opt, 3, seed0=10)
    saved_model = copy.deepcopy(net.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())

    net2 = make_net(seed=123)
    net2.load_state_dict(saved_model)
    opt2 = GritOptimizer(net2, cfg)
    opt2.load_state_dict(saved_opt)

    _run(net, opt, 4, seed0=20)
    _run(net2, opt2, 4, seed0=20)
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)
    assert opt.metrics() == opt2.metrics()


def test_lr_scheduler_and_accelerate_prepare():
    from accelerate import Accelerator
    from transformers import get_scheduler

    net = make_net()
    ref = copy.deepcopy(net)
    opt = GritOptimizer(net, GritConfig(lr=1e-2, reproject_steps=0))
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.inner.param_groups
    accelerator = Accelerator(cpu=True)
    net, aopt = accelerator.prepare(net, opt)
    sched = get_scheduler("linear", aopt, num_warmup_steps=0, num_training_steps=4)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    x, w = batch()
    for _ in range(2):
        accelerator.backward(masked_loss(net(x), w))
        aopt.step()
        sched.step()
        aopt.zero_grad()
        masked_loss(ref(x), w).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert opt.metrics()["grit/inversions"] == 2
    assert opt.inner.param_groups[0]["lr"] == pytest.approx(1e-2 * 2 / 4)
    assert not torch.allclose(net.l1.lora_A["default"].weight, ref.l1.lora_A["default"].weight)


def test_regularization_loss_off_by_default_and_differentiable_when_on():
    net = make_net()
    assert GritOptimizer(net, GritConfig()).regularization_loss().item() == 0.0
    net = make_net()
    opt = GritOptimizer(
        net,
        GritConfig(
            curvature_reg=1e-2,
            subspace_reg=1e-1,
            reproject_steps=1,
            reproject_warmup=0,
            rank_adaptation=False,
            reproject_rank=2,
        ),
    )
    x, w = batch()
    assert opt.regularization_loss().item() == 0.0  # no factors, no subspace yet
    masked_loss(net(x), w).backward()
    opt.step()
    opt.zero_grad()
    net.l1.lora_A["default"].weight.data.add_(0.1)  # move A off the kept subspace
    reg = opt.regularization_loss()
    assert reg.item() > 0
    reg.backward()
    assert net.l1.lora_A["default"].weight.grad.abs().sum() > 0


def test_tiny_peft_llama_end_to_end():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    model = get_peft_model(
        LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    opt = GritOptimizer(
        model, GritConfig(lr=1e-3, reproject_steps=2, reproject_warmup=0, min_rank=1, energy_threshold=0.9)
    )
    assert len(opt.layers) == 6
    ids = torch.randint(0, 100, (2, 8))
    attn = torch.ones(2, 8, dtype=torch.long)
    attn[1, 5:] = 0
    for _ in range(4):
        opt.set_token_mask(attn)
        out = model(input_ids=ids, attention_mask=attn, labels=ids.masked_fill(attn == 0, -100))
        (out.loss + opt.regularization_loss()).backward()
        opt.step()
        opt.zero_grad()
    m = opt.metrics()
    assert m["grit/reprojections"] == 2 and m["grit/inversions"] == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "grit/effective_rank/model.layers.0.self_attn.q_proj" in m
    assert opt.banks[0].count.sum() == 0  # sums consumed
    opt.remove_hooks()
    model(input_ids=ids).logits.sum().backward()
    opt.collector.harvest()
    assert opt.banks[0].count.sum() == 0  # hooks gone
