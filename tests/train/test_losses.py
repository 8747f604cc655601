"""Every method's loss against an independent reference: TRL, closed forms, dense computations."""

import math

import pytest
import torch
import torch.nn.functional as F
from train_helpers import dense_token_logps, tiny_peft, toy_pairs, trl_dpo_loss

from ecliptica.losses import CITAConfig, CITALoss, DPOConfig, DPOLoss, SequenceStats, SFTConfig, SFTLoss
from ecliptica.losses.layout import CHOSEN_ONLY, PAIRED
from ecliptica.train.batching import collate
from ecliptica.train.policy import PolicyModel


@pytest.fixture(scope="module")
def peft_model(tiny_model_dir):
    return tiny_peft(tiny_model_dir)


def _stats(peft_model, pairs, packed=True, with_rejected=True, ref=True, kl=False, chunk=7):
    batch = collate(pairs, PAIRED if with_rejected else CHOSEN_ONLY, pad_id=2, packed=packed)
    return PolicyModel(peft_model, chunk_size=chunk)(batch, need_reference=ref, need_token_kl=kl)


def test_dpo_matches_trl(tiny_model_dir, tmp_path):
    """Same model, same token ids: TRL 1.16's DPOTrainer loss and ours agree to 1e-5."""
    pairs = toy_pairs(3)
    trl_loss, model = trl_dpo_loss(tiny_model_dir, tmp_path, pairs, beta=0.1)
    with torch.no_grad():
        ours, metrics = DPOLoss(DPOConfig(beta=0.1))(_stats(model, pairs))
    assert float(trl_loss) != pytest.approx(math.log(2), abs=1e-3)  # policy != reference: a real comparison
    assert abs(float(trl_loss) - float(ours)) < 1e-5


def test_dpo_closed_form_with_label_smoothing():
    lp = torch.tensor([-3.0, -5.0, -4.0, -4.5])  # chosen 1,2 then rejected 1,2
    ref = torch.tensor([-3.5, -4.0, -4.2, -4.0])
    s = SequenceStats(lp, torch.tensor([3, 3, 3, 3]), ref)
    beta, eps = 0.5, 0.2
    loss, m = DPOLoss(DPOConfig(beta=beta, label_smoothing=eps))(s)
    expected = []
    for i in range(2):
        z = beta * ((lp[i] - ref[i]) - (lp[i + 2] - ref[i + 2]))
        sig = 1 / (1 + math.exp(-float(z)))
        expected.append(-(1 - eps) * math.log(sig) - eps * math.log(1 - sig))
    assert float(loss) == pytest.approx(sum(expected) / 2, abs=1e-6)
    assert float(m["rewards/chosen"]) == pytest.approx(beta * (0.5 - 1.0) / 2, abs=1e-6)
    assert float(m["rewards/accuracies"]) == 0.5


def test_cita_lambda0_equals_closed_form(peft_model):
    pairs = toy_pairs(3, seed=4)
    dense = dense_token_logps(peft_model, pairs)
    seq = [float(lp.gather(-1, t[:, None]).sum()) for lp, t in dense]
    beta = 0.3
    expected = sum(-math.log(1 / (1 + math.exp(-beta * (seq[i] - seq[i + 3])))) for i in range(3)) / 3
    with torch.no_grad():
        loss, _ = CITALoss(CITAConfig(beta=beta, lambda_kl=0.0))(_stats(peft_model, pairs, ref=False))
    assert float(loss) == pytest.approx(expected, abs=1e-5)


def test_token_kl_equals_dense_reference(peft_model):
    pairs = toy_pairs(3, seed=5)
    policy = dense_token_logps(peft_model, pairs)
    with peft_model.disable_adapter():
        reference = dense_token_logps(peft_model, pairs)
    total, count = 0.0, 0
    for (lp, _), (lq, _) in zip(policy, reference):
        total += float((lp.exp() * (lp - lq)).sum())
        count += lp.shape[0]
    with torch.no_grad():
        s = _stats(peft_model, pairs, kl=True, chunk=5)
        cfg = CITAConfig(beta=0.1, lambda_kl=0.7)
        loss, m = CITALoss(cfg)(s)
    assert float(m["kl"]) == pytest.approx(total / count, rel=1e-5)
    assert float(m["kl"]) > 0
    contrastive = float(m["loss/contrastive"])
    assert float(loss) == pytest.approx(contrastive + 0.7 * total / count, rel=1e-5)


def test_token_kl_zero_for_fresh_adapter(tiny_model_dir):
    fresh = tiny_peft(tiny_model_dir, randomize_b=False)  # LoRA B = 0: policy == reference
    with torch.no_grad():
        s = _stats(fresh, toy_pairs(2), kl=True)
    assert abs(float(s.token_kl_sum)) < 1e-6
    assert torch.allclose(s.logps, s.ref_logps, atol=1e-5)


def test_seq_logratio_proxies():
    lp, ref = torch.tensor([-2.0, -3.0, -5.0, -1.0]), torch.tensor([-2.5, -2.0, -4.0, -1.5])
    s = SequenceStats(lp, torch.tensor([2, 2, 2, 2]), ref)
    ratios = [0.5, -1.0, -1.0, 0.5]
    sq = CITALoss(CITAConfig(kl="seq_logratio_sq")).kl_term(s)
    assert float(sq) == pytest.approx(sum(r * r for r in ratios) / 4)
    with pytest.raises(ValueError, match="unbounded"):
        CITALoss(CITAConfig(kl="seq_logratio"))
    signed = CITALoss(CITAConfig(kl="seq_logratio", allow_unbounded_kl=True)).kl_term(s)
    assert float(signed) == pytest.approx(sum(ratios) / 4)


def test_cita_lambda_anneal_and_length_normalisation():
    loss = CITALoss(CITAConfig(lambda_kl=0.1, lambda_kl_end=0.0))
    assert [loss.lambda_at(p) for p in (0, 0.5, 1)] == pytest.approx([0.1, 0.05, 0.0])
    s = SequenceStats(
        torch.tensor([-4.0, -9.0]), torch.tensor([2, 3]), torch.tensor([-4.0, -9.0]), token_kl_sum=torch.tensor(0.0)
    )
    val, _ = CITALoss(CITAConfig(beta=1.0, lambda_kl=0.0, length_normalize=True))(s)
    assert float(val) == pytest.approx(-math.log(1 / (1 + math.exp(-(-2.0 + 3.0)))), abs=1e-6)


def test_sft_matches_hf_loss(peft_model):
    """Completion-only NLL equals transformers' own CE loss with prompt and padding labels at -100."""
    pairs = toy_pairs(3, seed=7)
    seqs = [list(p.prompt_ids) + list(p.chosen_ids) for p in pairs]
    width = max(map(len, seqs))
    ids = torch.full((3, width), 2)
    labels = torch.full((3, width), -100)
    mask = torch.zeros((3, width), dtype=torch.long)
    for i, (p, s) in enumerate(zip(pairs, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, len(p.prompt_ids) : len(s)] = torch.tensor(p.chosen_ids)
    with torch.no_grad():
        hf = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        ours, _ = SFTLoss(SFTConfig())(_stats(peft_model, pairs, with_rejected=False, ref=False))
    assert float(ours) == pytest.approx(float(hf), rel=1e-5)


def test_packed_and_padded_logps_agree(peft_model):
    pairs = toy_pairs(4, seed=9)
    with torch.no_grad():
        packed = _stats(peft_model, pairs, packed=True, kl=True)
        padded = _stats(peft_model, pairs, packed=False, kl=True)
    assert torch.allclose(packed.logps, padded.logps, atol=1e-4, rtol=1e-5)
    assert torch.allclose(packed.ref_logps, padded.ref_logps, atol=1e-4, rtol=1e-5)
    assert float(packed.token_kl_sum) == pytest.approx(float(padded.token_kl_sum), rel=1e-4)


def test_chunked_gradients_match_dense(peft_model):
    """Checkpointed chunks give the same gradients as one dense log-softmax."""
    from ecliptica.train.policy import chunked_logps

    torch.manual_seed(0)
    h = torch.randn(11, 32, requires_grad=True)
    w = torch.randn(50, 32)
    t = torch.randint(0, 50, (11,))
    lp, _, _ = chunked_logps(h, w, t, chunk_size=4)
    lp.sum().backward()
    g_chunk = h.grad.clone()
    h.grad = None
    F.log_softmax(h @ w.T, -1).gather(-1, t[:, None]).sum().backward()
    assert torch.allclose(g_chunk, h.grad, atol=1e-5)


def test_chunked_token_kl_gradient_matches_dense():
    """Token KL through the checkpointed chunks (reference rebuilt from its hidden states inside the
    chunk): same value, reference log-probs and gradient as a dense full-vocabulary computation."""
    from ecliptica.train.policy import chunked_logps

    torch.manual_seed(1)
    h = torch.randn(13, 32, requires_grad=True)
    ref_h = torch.randn(13, 32)
    w = torch.randn(50, 32)
    t = torch.randint(0, 50, (13,))
    lp, ref_lp, kl = chunked_logps(h, w, t, chunk_size=4, ref_hidden=ref_h, with_kl=True)
    (lp.sum() + 3.0 * kl.sum()).backward()
    g_chunk = h.grad.clone()
    h.grad = None
    dense_p = F.log_softmax(h @ w.T, -1)
    dense_q = F.log_softmax(ref_h @ w.T, -1)
    dense_kl = (dense_p.exp() * (dense_p - dense_q)).sum(-1)
    (dense_p.gather(-1, t[:, None]).sum() + 3.0 * dense_kl.sum()).backward()
    assert torch.allclose(kl.detach(), dense_kl.detach(), atol=1e-5)
    assert torch.allclose(ref_lp, dense_q.gather(-1, t[:, None]).squeeze(-1), atol=1e-5)
    assert torch.allclose(g_chunk, h.grad, atol=1e-4)


def test_trained_lm_head_falls_back_to_autograd():
    """A trainable LM head (e.g. modules_to_save) needs its weight gradient: the checkpointed autograd
    path gives the same gradients as a dense computation."""
    from ecliptica.train.policy import chunked_logps

    torch.manual_seed(2)
    h = torch.randn(9, 16, requires_grad=True)
    ref_h = torch.randn(9, 16)
    w = torch.randn(30, 16, requires_grad=True)
    t = torch.randint(0, 30, (9,))
    lp, _, kl = chunked_logps(h, w, t, chunk_size=4, ref_hidden=ref_h, with_kl=True)
    (lp.sum() + kl.sum()).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    p, q = F.log_softmax(h @ w.T, -1), F.log_softmax(ref_h @ w.T, -1).detach()  # the reference is frozen
    (p.gather(-1, t[:, None]).sum() + (p.exp() * (p - q)).sum()).backward()
    assert torch.allclose(gh, h.grad, atol=1e-4) and torch.allclose(gw, w.grad, atol=1e-4)


def test_per_sequence_kl_under_bf16_autocast(tiny_model_dir):
    """Under bf16 autocast (the GPU default) the per-sequence KL is accumulated into fp32 like the log-probs.
    Regression: index_add_ of bf16 token KLs into an fp32 buffer raised on the H200 and stopped every CITA run."""
    from train_helpers import policy_stats, tiny_peft, toy_pairs

    model, pairs = tiny_peft(tiny_model_dir), toy_pairs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = policy_stats(model, pairs, kl=True)
    assert s.seq_token_kl.dtype == torch.float32
    # the per-sequence sums add up to the micro-batch total the loss uses (hand identity, bf16 tolerance)
    assert float(s.seq_token_kl.sum()) == pytest.approx(float(s.token_kl_sum), rel=2e-2, abs=1e-3)


def test_chunked_token_kl_is_fp32_under_bf16_autocast():
    """On the GPU the chunks run under bf16 autocast. The KL's sum over the vocabulary must stay in fp32 there: a
    matmul would be cast to bf16, and with a reference close to the policy the bf16-rounded terms cancel badly (a
    bmm here gave a 3.6% KL error and a 2.3e-3 gradient error). Under CPU bf16 autocast the KL and its gradient
    match a float64 computation from the same bf16 logits to fp32's precision."""
    from ecliptica.train.policy import chunked_logps

    torch.manual_seed(2)
    h = torch.randn(9, 32, requires_grad=True)
    ref_h = h.detach() + 0.05 * torch.randn(9, 32)  # a reference close to the policy: a small KL, as in training
    w = torch.randn(3000, 32) / 4
    t = torch.randint(0, 3000, (9,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, kl = chunked_logps(h, w, t, chunk_size=4, ref_hidden=ref_h, with_kl=True)
        kl.sum().backward()
        logits, ref_logits = F.linear(h, w).double(), F.linear(ref_h, w).double()  # the bf16 logits autocast makes
    grad, h.grad = h.grad.clone(), None
    p, q = F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1)
    dense_kl = (p.exp() * (p - q)).sum(-1)
    dense_kl.sum().backward()
    assert kl.dtype == torch.float32
    assert float(((kl.detach().double() - dense_kl.detach()) / dense_kl.detach()).abs().max()) < 1e-3
    assert float((grad.double() - h.grad).norm() / h.grad.norm()) < 1e-3
