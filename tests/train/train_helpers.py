"""Small builders shared by the engine tests."""

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from ecliptica.config import TrainConfig
from ecliptica.data import TokenizedPair

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomize_lora_b(model, seed: int, scale: float = 0.5) -> None:
    """A non-zero adapter (B = 0 at LoRA init would make policy and reference the same network)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * scale


def tiny_lora_llama(intermediate_size: int, vocab_size: int, b_std: float, prepare=None, **config):
    """A 2-layer random Llama (hidden 64, seed 0) with LoRA r4 on the seven projections and B drawn with `b_std`, so
    every LoRA path carries gradient. `prepare(model)` runs on the base before LoRA is applied (e.g. quantising)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=intermediate_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=vocab_size,
            attn_implementation="sdpa",
            **config,
        )
    )
    if prepare is not None:
        prepare(model)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS))
    for name, w in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(w, std=b_std)
    return peft


def tiny_peft(model_dir, seed=0, randomize_b=True, r=4):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(
        r=r,
        lora_alpha=8,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    peft_model = get_peft_model(model, cfg)
    if randomize_b:
        randomize_lora_b(peft_model, seed + 1)
    return peft_model.eval()


def toy_pairs(n=3, seed=0, vocab=49152):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda k: tuple(int(x) for x in torch.randint(10, vocab, (k,), generator=g))  # noqa: E731
    return [TokenizedPair(rnd(5 + i), rnd(3 + 2 * i), rnd(6 - i), f"r{i}") for i in range(n)]


def dense_token_logps(peft_model, pairs, with_rejected=True):
    """Reference: one unpadded HF forward per sequence, full log-softmax, gather the response tokens."""
    seqs = [(p.prompt_ids, p.chosen_ids) for p in pairs]
    if with_rejected:
        seqs += [(p.prompt_ids, p.rejected_ids) for p in pairs]
    out = []
    for prompt, resp in seqs:
        ids = torch.tensor([list(prompt) + list(resp)])
        logits = peft_model(input_ids=ids).logits[0].float()
        logprobs = torch.log_softmax(logits, -1)
        pos = torch.arange(len(prompt) - 1, len(prompt) + len(resp) - 1)
        out.append((logprobs[pos], torch.tensor(resp)))
    return out


def policy_stats(peft_model, pairs, with_rejected=True, ref=True, kl=False, chunk=7):
    """Our engine's SequenceStats for `pairs` (one packed micro-batch)."""
    from ecliptica.losses.layout import CHOSEN_ONLY, PAIRED
    from ecliptica.train.batching import collate
    from ecliptica.train.policy import PolicyModel

    batch = collate(pairs, PAIRED if with_rejected else CHOSEN_ONLY, pad_id=2, packed=True)
    return PolicyModel(peft_model, chunk_size=chunk)(batch, need_reference=ref, need_token_kl=kl)


def padded_batch(pairs, with_rejected=True, pad_id=2):
    """HF-style right-padded [chosen..., rejected...] sequences: input ids, attention mask, and labels with the
    prompt and the padding at -100 (the layout TRL's trainers feed their log-prob and NLL functions)."""
    seqs = [(p.prompt_ids, p.chosen_ids) for p in pairs]
    if with_rejected:
        seqs += [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), width), pad_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100)
    for i, (prompt, resp) in enumerate(seqs):
        n = len(prompt) + len(resp)
        ids[i, :n] = torch.tensor(list(prompt) + list(resp))
        mask[i, :n] = 1
        labels[i, len(prompt) : n] = torch.tensor(resp)
    return ids, mask, labels


def trl_dpo_loss(model_dir, out_dir, pairs, **dpo_args):
    """TRL's DPOTrainer loss on `pairs` (our token ids) and the LoRA model it was computed with (the same
    model scores ours). TRL creates the adapter, so its reference is the disabled adapter, as ours is; the
    adapter's B matrices are randomised so the policy differs from the reference (a real comparison)."""
    import pytest

    datasets = pytest.importorskip("datasets")
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2  # TRL wants a dataset; our ids are scored below
    args = DPOConfig(output_dir=str(out_dir), report_to="none", use_cpu=True, **dpo_args)
    trainer = DPOTrainer(
        model=base, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok, peft_config=lora
    )
    randomize_lora_b(trainer.model, 1)
    trainer.model.eval()
    examples = [
        {"prompt_ids": list(p.prompt_ids), "chosen_ids": list(p.chosen_ids), "rejected_ids": list(p.rejected_ids)}
        for p in pairs
    ]
    inputs = DataCollatorForPreference(pad_token_id=2)(examples)
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    return float(loss), trainer.model


def cita_grit_config(run_dir, model_dir, limit, lr, **train):
    """A short fp32 CITA + GRIT run under gradient checkpointing: the reference pass, the token KL and GRIT's hooks
    on every LoRA layer, for tests that compare a speed path with the plain one (`train`: train-section keys)."""
    return TrainConfig.model_validate(
        {
            "run_dir": str(run_dir),
            "seed": 3,
            "model": {"name": str(model_dir), "dtype": "fp32", "gradient_checkpointing": True},
            "lora": {"r": 4, "alpha": 8},
            "method": {"name": "cita", "lambda_kl": 0.05},
            "data": {"limit": limit, "max_length": 160, "max_prompt_length": 96},
            "optimizer": {"name": "grit", "lr": lr},
            "schedule": {"name": "linear", "warmup_steps": 1},
            "train": {"max_steps": 3, "micro_batch_size": 2, "grad_accum": 2, "progress": False, **train},
        }
    )
