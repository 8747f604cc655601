"""The engine end to end on a tiny random Llama: run outputs, exact resume, seeds, errors."""

import json

import pytest

from ecliptica.config import TrainConfig, load_config
from ecliptica.provenance import versions
from ecliptica.train import NonFiniteError, Trainer, read_train_summary


def _cfg(tmp_path, model_dir, method="dpo", **train):
    t = {"max_steps": 4, "micro_batch_size": 2, "grad_accum": 2, "progress": False, **train}
    return TrainConfig.model_validate(
        {
            "run_dir": str(tmp_path / f"run_{method}"),
            "seed": 3,
            "model": {"name": str(model_dir)},
            "lora": {"r": 4, "alpha": 8},
            "method": {"name": method, **({"lambda_kl": 0.05} if method == "cita" else {})},
            "data": {"limit": 24, "max_length": 160, "max_prompt_length": 96},
            "optimizer": {"lr": 5e-3},
            "schedule": {"name": "linear", "warmup_steps": 1},
            "train": t,
        }
    )


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["sft", "dpo", "cita"])
def test_each_method_trains_and_writes_a_run(tmp_path, tiny_model_dir, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tmp_path, tiny_model_dir, method, max_steps=3)
    summary = Trainer(cfg).setup().train()
    run = tmp_path / f"run_{method}"
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "adapter/adapter_config.json"):
        assert (run / f).exists(), f
    assert list((run / "tb").rglob("events.out.tfevents.*"))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    keys = {"loss", "grad_norm", "lr", "tokens_per_s", "step_time_s"}
    if method != "sft":
        keys |= {
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected",
        }
    if method == "cita":
        keys |= {"kl", "loss/contrastive"}
    assert keys <= set(lines[-1])
    s = json.loads((run / "summary.json").read_text())
    for k in (
        "train_seconds",
        "train_tokens",
        "tokens_per_s",
        "peak_gpu_memory_gib",
        "final_metrics",
        "config_hash",
        "data_hash",
        "versions",
        "git_commit",
    ):
        assert k in s
    assert s["versions"] == versions()  # as evaluation records them
    assert s["train_tokens"] > 0 and summary["config_hash"] == cfg.hash()
    # the typed summary reads back what was written, and train() returned that same JSON
    assert read_train_summary(run / "summary.json").as_json() == summary == s
    assert summary["final_metrics"] == {k: v for k, v in lines[-1].items() if k != "step"}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, run / "adapter")
    b = [p for n, p in loaded.named_parameters() if "lora_B" in n]
    assert any(float(p.abs().sum()) > 0 for p in b)  # training moved the adapter


def test_dpo_first_step_loss_is_log2(tmp_path, tiny_model_dir):
    """At step 1 the adapter is zero, so policy == reference and the DPO loss is exactly log 2."""
    Trainer(_cfg(tmp_path, tiny_model_dir, "dpo", max_steps=1)).setup().train()
    assert _losses(tmp_path / "run_dpo")[0] == pytest.approx(0.693147, abs=1e-5)


@pytest.mark.parametrize("method", ["cita", "kto"])  # paired and unpaired examples
def test_resume_reproduces_uninterrupted_losses(tmp_path, tiny_model_dir, method):
    full = _cfg(tmp_path / "a", tiny_model_dir, method, max_steps=5, save_every=2)
    Trainer(full).setup().train()
    expected = _losses(tmp_path / "a" / f"run_{method}")

    part = _cfg(tmp_path / "b", tiny_model_dir, method, max_steps=5, save_every=2)
    Trainer(part).setup().train(stop_after=3)  # "killed" after step 3; last checkpoint is step 2
    assert (tmp_path / "b" / f"run_{method}" / "checkpoints" / "step-2" / "trainer.json").exists()
    Trainer(part).setup().train(resume=True)
    resumed = _losses(tmp_path / "b" / f"run_{method}")
    assert len(resumed) == 5
    assert resumed == pytest.approx(expected, rel=1e-5)


def test_same_seed_same_losses_and_seed_matters(tmp_path, tiny_model_dir):
    runs = []
    for sub, seed in (("x", 3), ("y", 3), ("z", 4)):
        cfg = _cfg(tmp_path / sub, tiny_model_dir, "dpo", max_steps=3)
        cfg.seed = seed
        Trainer(cfg).setup().train()
        runs.append(_losses(tmp_path / sub / "run_dpo"))
    assert runs[0] == runs[1]
    assert runs[0][1:] != runs[2][1:]


def test_precomputed_reference_matches_online(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("ECLIPTICA_CACHE", str(tmp_path / "cache"))
    online = _cfg(tmp_path / "on", tiny_model_dir, "dpo", max_steps=3)
    Trainer(online).setup().train()
    cached = _cfg(tmp_path / "pre", tiny_model_dir, "dpo", max_steps=3)
    cached.method.precompute_reference = True
    Trainer(cached).setup().train()
    assert list((tmp_path / "cache" / "reference").glob("*.safetensors"))
    assert _losses(tmp_path / "pre" / "run_dpo") == pytest.approx(_losses(tmp_path / "on" / "run_dpo"), rel=1e-4)


def test_ratio_metrics_are_step_means_over_their_examples(tmp_path, tiny_model_dir, monkeypatch):
    """A Ratio metric logs (sum of num) / (sum of den) over the step's micro-batches: here num = 2 x the chosen
    log-prob and den = 2 give the plain mean (logps/chosen); a den that is 0 in every micro-batch logs nothing."""
    import torch

    from ecliptica.losses import PAIRED, Ratio

    trainer = Trainer(_cfg(tmp_path, tiny_model_dir, "dpo", max_steps=2, micro_batch_tokens=None)).setup()
    real = trainer.loss_fn.__class__.__call__

    def with_ratios(self, s, progress=0.0):
        loss, m = real(self, s, progress)
        chosen = PAIRED.split(s.logps)[0].mean()
        m["twice/chosen"] = Ratio(2 * chosen, torch.tensor(2.0))
        m["never"] = Ratio(torch.tensor(0.0), torch.tensor(0.0))
        return loss, m

    monkeypatch.setattr(trainer.loss_fn.__class__, "__call__", with_ratios)
    trainer.train()
    lines = [json.loads(x) for x in (tmp_path / "run_dpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert line["twice/chosen"] == pytest.approx(line["logps/chosen"], rel=1e-6) and "never" not in line


def test_nonfinite_loss_stops_with_step(tmp_path, tiny_model_dir, monkeypatch):
    cfg = _cfg(tmp_path, tiny_model_dir, "sft", max_steps=3)
    trainer = Trainer(cfg).setup()
    calls = {"n": 0}
    real = trainer.loss_fn.__class__.__call__

    def flaky(self, s, progress=0.0):
        calls["n"] += 1
        loss, m = real(self, s, progress)
        return (loss * float("nan"), m) if calls["n"] > 2 else (loss, m)  # micro-steps 3+: step 2

    monkeypatch.setattr(trainer.loss_fn.__class__, "__call__", flaky)
    with pytest.raises(NonFiniteError, match="step 2"):
        trainer.train()


def test_nonfinite_skip_counts(tmp_path, tiny_model_dir, monkeypatch):
    cfg = _cfg(tmp_path, tiny_model_dir, "sft", max_steps=2, on_nonfinite="skip")
    trainer = Trainer(cfg).setup()
    real = trainer.loss_fn.__class__.__call__
    monkeypatch.setattr(
        trainer.loss_fn.__class__,
        "__call__",
        lambda self, s, progress=0.0: (real(self, s, progress)[0] * float("inf"), {}),
    )
    summary = trainer.train()
    assert summary["nonfinite_skipped"] == 2


def test_grit_optimizer_runs_in_engine(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, "dpo", max_steps=3)
    cfg.optimizer.name = "grit"
    cfg.optimizer.grit = {"reproject_steps": 2, "reproject_warmup": 1}
    summary = Trainer(cfg).setup().train()
    last = json.loads((tmp_path / "run_dpo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["grit/inversions"] > 0
    # physical LoRA parameters of the tiny model by hand: 2 layers x r=4 x sum(in+out) over the 7 projections
    widths = (32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + (32 + 64) + (32 + 64) + (64 + 32)
    assert summary["lora_parameters"]["physical"] == 2 * 4 * widths


def test_config_rejects_unknown_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ValueError, match="max_stepz"):
        load_config(p)
    with pytest.raises(ValueError, match="nonsense"):
        load_config(None, ["method.nonsense=1"])
    cfg = load_config(None, ["method.beta=0.25", "train.max_steps=7"])
    assert cfg.method.beta == 0.25 and cfg.train.max_steps == 7


def test_split_by_tokens_keeps_order_and_budget():
    from ecliptica.train.batching import split_by_tokens

    assert split_by_tokens([5, 6, 7, 8, 9], [300, 200, 600, 100, 50], 500) == [[5, 6], [7], [8, 9]]
    assert split_by_tokens([1, 2], [900, 10], 500) == [[1], [2]]  # an over-budget pair runs alone


@pytest.mark.parametrize("method", ["dpo", "sft"])
def test_token_budget_micro_batches_equal_one_big_batch(tmp_path, tiny_model_dir, method):
    """DPO: re-splitting a step's 8 pairs by packed tokens (unequal micro-batches, each weighted by its
    share of pairs) gives the same per-step losses and adapter as the 8 pairs in one micro-batch, since
    the DPO loss is a mean over pairs. SFT's loss is a token mean per micro-batch, which only a budget
    holding the whole step reproduces exactly; that case is checked."""
    import torch
    from safetensors.torch import load_file

    big = Trainer(_cfg(tmp_path / "big", tiny_model_dir, method, max_steps=3, micro_batch_size=8, grad_accum=1)).setup()
    budget = 500 if method == "dpo" else 10_000
    split_cfg = _cfg(
        tmp_path / "split",
        tiny_model_dir,
        method,
        max_steps=3,
        micro_batch_size=2,
        grad_accum=4,
        micro_batch_tokens=budget,
    )
    split = Trainer(split_cfg).setup()
    groups = split.step_micro_batches(0)
    assert [i for g in groups for i in g] == big.step_micro_batches(0)[0]  # same pairs, same order
    if method == "dpo":
        sizes = [len(g) for g in groups]
        assert len(groups) >= 3 and len(set(sizes)) > 1, sizes  # really unequal micro-batches
    else:
        assert len(groups) == 1
    big.train()
    split.train()
    assert _losses(tmp_path / "split" / f"run_{method}") == pytest.approx(
        _losses(tmp_path / "big" / f"run_{method}"), rel=1e-5
    )
    a = load_file(str(tmp_path / "big" / f"run_{method}" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "split" / f"run_{method}" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("method,optimizer", [("dpo", "adamw"), ("cita", "adamw"), ("sft", "adamw"), ("cita", "grit")])
def test_auto_micro_batches_equal_plain_split(tmp_path, tiny_model_dir, method, optimizer):
    """The default (`micro_batch_tokens: auto`; on CPU the configured worst case, 2 pairs x 160 tokens) re-splits
    each step's 8 pairs into unequal packed micro-batches. Since every micro-batch is weighted by its share of
    pairs and token means (SFT's NLL, CITA's KL) are over the step's tokens, the per-step losses and the adapter
    equal the plain 2 x 4 split's, GRIT's K-FAC factors and reprojection included."""
    import torch
    from safetensors.torch import load_file

    runs = {}
    for name, tokens in (("plain", None), ("auto", "auto")):
        cfg = _cfg(
            tmp_path / name,
            tiny_model_dir,
            method,
            max_steps=3,
            micro_batch_size=2,
            grad_accum=4,
            micro_batch_tokens=tokens,
        )
        if optimizer == "grit":
            cfg.optimizer.name = "grit"
            cfg.optimizer.grit = {"reproject_steps": 2, "reproject_warmup": 1}
        runs[name] = Trainer(cfg).setup()
    auto, plain = runs["auto"], runs["plain"]
    assert auto.micro_batches.tokens == 2 * 160 * (1 if method == "sft" else 2)
    for step in range(3):
        a, p = auto.step_micro_batches(step), plain.step_micro_batches(step)
        assert [i for g in a for i in g] == [i for g in p for i in g]  # same pairs, same order
        assert [len(g) for g in p] == [2, 2, 2, 2]
    assert any([len(g) for g in auto.step_micro_batches(s)] != [2, 2, 2, 2] for s in range(3))  # really re-split
    summaries = {name: tr.train() for name, tr in runs.items()}
    assert _losses(tmp_path / "auto" / f"run_{method}") == pytest.approx(
        _losses(tmp_path / "plain" / f"run_{method}"), rel=1e-5
    )
    if optimizer == "grit":
        fa, fp = (summaries[n]["final_metrics"] for n in ("auto", "plain"))
        assert fa["grit/reprojections"] == fp["grit/reprojections"] == 1
        assert fa["grit/precond_grad_ratio"] == pytest.approx(fp["grit/precond_grad_ratio"], rel=1e-4)
    a = load_file(str(tmp_path / "auto" / f"run_{method}" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "plain" / f"run_{method}" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k


def test_micro_batch_tokens_setting_parses():
    assert TrainConfig().train.micro_batch_tokens == "auto"  # every config gets sizing with no knob set
    for text, expected in (("off", None), ("null", None), ("2048", 2048), ("auto", "auto")):
        assert load_config(None, [f"train.micro_batch_tokens={text}"]).train.micro_batch_tokens == expected
    for bad in ("0", "-5", "lots"):
        with pytest.raises(ValueError, match="micro_batch_tokens"):
            load_config(None, [f"train.micro_batch_tokens={bad}"])


def test_memory_probe_leaves_no_trace(tmp_path, tiny_model_dir, monkeypatch):
    """The start-up probe (forward + backward of two micro-batches) must not change the run: no gradient,
    GRIT factor sum or random draw (LoRA dropout here) may leak into step 1. The CUDA memory counters are
    stubbed so the probe runs on CPU."""
    import torch

    from ecliptica.train import sizing

    fake = iter([0, 3e6, 0, 7e6])  # memory_allocated / max_memory_allocated, in call order
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: next(fake))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: next(fake))
    for name in ("probed", "fresh"):  # each run set up and trained in turn: the global random stream is shared
        cfg = _cfg(tmp_path / name, tiny_model_dir, "cita", max_steps=3, micro_batch_tokens=None)
        cfg.lora.dropout = 0.1
        cfg.optimizer.name = "grit"
        tr = Trainer(cfg).setup()
        if name == "probed":
            rng = torch.get_rng_state()
            assert sizing.probe_memory(tr.memory_probe(), 2, 2 * 2 * 160).bytes_per_token > 0
            assert all(p.grad is None for p in tr.policy.parameters())
            assert all(
                float(b.a_sum.abs().sum() + b.g_sum.abs().sum() + b.count.sum()) == 0 for b in tr.optimizer_hooks.banks
            )
            assert torch.equal(torch.get_rng_state(), rng)
        tr.train()
    assert _losses(tmp_path / "probed" / "run_cita") == _losses(tmp_path / "fresh" / "run_cita")


def test_memory_probe_runs_with_the_gradients_allocated(tmp_path, tiny_model_dir, monkeypatch):
    """A step's micro-batches after its first find the gradients allocated. The probe measures its micro-batches the
    same way, so the sizing counts the gradients once, in the allocation it starts from, and not again in the peak."""
    import torch

    from ecliptica.train import sizing

    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 0)
    peaks = iter([1e6, 3e6])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: next(peaks))
    tr = Trainer(_cfg(tmp_path, tiny_model_dir, "dpo", micro_batch_tokens=None)).setup()
    real, seen = tr.micro_step, []

    def micro_step(idx, progress):
        trainable = [p for p in tr.policy.parameters() if p.requires_grad]
        seen.append(all(p.grad is not None and not p.grad.any() for p in trainable))
        return real(idx, progress)

    monkeypatch.setattr(tr, "micro_step", micro_step)
    sizing.probe_memory(tr.memory_probe(), 2, 2 * 2 * 160)
    assert seen == [True, True]
    assert all(p.grad is None for p in tr.policy.parameters())  # and nothing is left behind


def test_memory_probe_falls_back_to_a_configured_micro_batch_when_the_larger_one_runs_out(
    tmp_path, tiny_model_dir, monkeypatch
):
    """The probe's large micro-batch may hold more pairs than `micro_batch_size`. If that runs out of memory (simulated
    here after its backward, with gradients made), the probe warns, measures the `micro_batch_size` longest pairs
    instead and leaves no gradient behind; if a configured-size group runs out too, the error is not hidden."""
    import torch

    from ecliptica.train import sizing

    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 0)
    peaks = iter([1e6, 3e6])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: next(peaks))
    tr = Trainer(_cfg(tmp_path, tiny_model_dir, "dpo", micro_batch_tokens=None)).setup()  # 2 pairs x grad-accum 2
    step0 = [i for k in range(2) for i in tr.micro_batch_indices(k)]
    pairs = [tr.data.pairs[i] for i in step0]  # a pair's packed tokens, by hand: its prompt twice and both responses
    size = {i: 2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for i, p in zip(step0, pairs)}
    by_size = sorted(size, key=lambda i: (size[i], i))
    real, groups = tr.micro_step, []

    def micro_step(idx, progress):
        groups.append(list(idx))
        loss, info, n = real(idx, progress)
        if len(idx) > 2:
            tr.accelerator.backward(loss)
            raise torch.cuda.OutOfMemoryError("simulated")
        return loss, info, n

    monkeypatch.setattr(tr, "micro_step", micro_step)
    with pytest.warns(UserWarning, match="ran out of memory; probing the 2 longest"):
        fit = sizing.probe_memory(tr.memory_probe(), 2, 2 * 2 * 160)
    assert len(groups) == 3 and len(groups[1]) > 2, (size, groups)  # small, the larger probe (failed), the fallback
    assert sum(size[i] for i in groups[1]) <= 2 * 160 * 2  # within the configured worst case
    assert groups[0] == by_size[:1] and sorted(groups[2]) == sorted(by_size[-2:])
    # the line through (the shortest pair, 1e6 bytes) and (the 2 longest, 3e6 bytes)
    assert fit.bytes_per_token == pytest.approx(2e6 / (size[by_size[-1]] + size[by_size[-2]] - size[by_size[0]]))
    assert all(p.grad is None for p in tr.policy.parameters())

    def out_of_memory(idx, progress):  # the fallback's 2 pairs do not fit either
        if len(idx) >= 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(idx, progress)

    peaks = iter([1e6])
    monkeypatch.setattr(tr, "micro_step", out_of_memory)
    with pytest.warns(UserWarning, match="ran out of memory"), pytest.raises(torch.cuda.OutOfMemoryError):
        sizing.probe_memory(tr.memory_probe(), 2, 2 * 2 * 160)
    assert all(p.grad is None for p in tr.policy.parameters())
