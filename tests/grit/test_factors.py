import os
import socket
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from grit_helpers import batch, ddp_factor_worker, factors, make_net, masked_loss

from ecliptica.grit import GritConfig, GritOptimizer

CFG = dict(reproject_steps=0, lr=1e-3)


def _factors_after_step(net, micro_batches, cfg=None):
    """One optimizer step over (x, w, mask, loss_weight) micro-batches; returns the new factors."""
    opt = GritOptimizer(net, GritConfig(**(cfg or CFG)))
    for x, w, mask, scale in micro_batches:
        opt.set_token_mask(mask)
        (scale * masked_loss(net(x), w, mask)).backward()
    opt.step()
    sig = factors(opt)
    opt.remove_hooks()
    return sig


def test_padding_tokens_excluded():
    x, w = batch()
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 1:] = False
    x2 = x.clone()
    x2[~mask] = 100.0 * torch.randn(int((~mask).sum()), x.shape[-1])  # garbage in padding
    sig = _factors_after_step(make_net(), [(x, w, mask, 1.0)])
    sig2 = _factors_after_step(make_net(), [(x2, w, mask, 1.0)])
    unmasked = _factors_after_step(make_net(), [(x2, w, None, 1.0)])
    for s, s2, s3 in zip(sig, sig2, unmasked):
        torch.testing.assert_close(s, s2)
        assert not torch.allclose(s, s3)


def test_grad_accumulation_equals_full_batch():
    x, w = batch(b=4)
    full = _factors_after_step(make_net(), [(x, w, None, 1.0)])
    halves = _factors_after_step(make_net(), [(x[:2], w[:2], None, 0.5), (x[2:], w[2:], None, 0.5)])
    for s_full, s_acc in zip(full, halves):
        torch.testing.assert_close(s_full, s_acc)


def test_two_half_batch_sums_equal_full_batch_sums():
    """What the all-reduce does: summed sums/counts of two shards == one full batch."""
    x, w = batch(b=4)

    def sums(xs, ws, scale):
        net = make_net()
        opt = GritOptimizer(net, GritConfig(**CFG))
        (scale * masked_loss(net(xs), ws)).backward()
        opt.collector.harvest()  # the pending sums, as a step's factor update takes them
        bank = opt.banks[0]
        return bank.a_sum.clone(), bank.g_sum.clone(), bank.count.clone()

    full = sums(x, w, 1.0)
    # DDP averages grads over 2 ranks: each rank's own loss is its shard mean (scale 1), so
    # v is 2x the global one and Sigma_g is divided by world^2 after the SUM.
    s0, s1 = sums(x[:2], w[:2], 1.0), sums(x[2:], w[2:], 1.0)
    torch.testing.assert_close(s0[0] + s1[0], full[0])
    torch.testing.assert_close((s0[1] + s1[1]) / 4, full[1])
    torch.testing.assert_close(s0[2] + s1[2], full[2])


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_gradient_checkpointing_counts_once(mode):
    x, w = batch()
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 2:] = False
    plain = _factors_after_step(make_net(), [(x, w, mask, 1.0)])
    ckpt = _factors_after_step(make_net(checkpoint=mode), [(x.requires_grad_(), w, mask, 1.0)])
    for s, c in zip(plain, ckpt):
        torch.testing.assert_close(s, c)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_two_process_gloo_matches_single_process():
    x, w = batch(b=4)
    single = _factors_after_step(make_net(), [(x, w, None, 1.0)])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "factors.pt")
        # spawn (fork can deadlock with torch's threads); cost is mostly importing torch twice.
        mp.spawn(ddp_factor_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        multi = torch.load(out)
    for s, m in zip(single, multi):
        torch.testing.assert_close(s, m)


def test_ema_and_nonfinite_guard():
    net = make_net()
    opt = GritOptimizer(net, GritConfig(ema_decay=0.5, **CFG))
    x, w = batch()
    masked_loss(net(x), w).backward()
    opt.step()
    first = factors(opt)[0].clone()
    opt.zero_grad()
    masked_loss(net(2 * x), w).backward()
    bank = opt.banks[0]
    opt.collector.harvest()
    new = bank.a_sum / bank.count[:, None, None]
    opt.step()
    torch.testing.assert_close(factors(opt)[0], 0.5 * first + 0.5 * new)
    # A non-finite batch (e.g. fp16 overflow) leaves the factors untouched.
    opt.zero_grad()
    before = factors(opt)[0].clone()
    masked_loss(net(x * float("inf")), w).backward()
    for p in net.parameters():
        if p.grad is not None:
            p.grad.zero_()
    opt.step()
    torch.testing.assert_close(factors(opt)[0], before)
