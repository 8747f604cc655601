"""Shared pieces of the GPU benchmarks: random-init Llama shapes, HH-RLHF rows, one runner for the
ecliptica Trainer and one for TRL's DPOTrainer / SFTTrainer, all timed and counted the same way.

Timing (both sides): a host timestamp after `torch.cuda.synchronize()` at the end of every optimizer
step; s/step = (t[N] - t[2]) / (N - 2), i.e. the first two steps are skipped and everything between
step ends (logging included) is counted. Tokens: non-padding tokens of the policy sequences
(prompt+chosen and prompt+rejected; SFT: prompt+chosen) in steps 3..N, the same quantity TRL logs
as `num_tokens` (sum of the attention mask). Peak: torch.cuda.max_memory_allocated() after training,
reset just before it (model weights included, as TRL's anchor does).
MFU = 6 * N * tokens/s / peak_bf16, N = parameters that do matmul FLOPs (all parameters, minus the
input embedding when it is not tied to the LM head). For LoRA DPO/CITA 6N per token is also what is
actually done: 2N policy forward + 2N backward to the activations (frozen weights need no weight
gradient) + 2N reference forward; activation checkpointing adds a 2N recompute that MFU does not count.
"""

from __future__ import annotations

import gc
import gzip
import json
import os
import re
import time
from pathlib import Path

import torch

SHAPES = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "llama3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16, SXM datasheet (H200 has the H100's tensor cores)
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def add_common_args(ap) -> None:
    """Arguments every ours-vs-TRL benchmark takes: data, tokenizer, step count, vocabulary, output, time budget."""
    ap.add_argument("--data", default=".carry/hh_test.jsonl.gz")
    ap.add_argument("--tok", default=".carry/tok")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument(
        "--results",
        default="runs/benchmarks",
        help="output folder (git-ignored); results worth keeping are committed under results/benchmarks/<set>/",
    )
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip runs that start after this many seconds")
    ap.add_argument(
        "--no-cudnn-sdpa",
        action="store_true",
        help="torch.backends.cuda.enable_cudnn_sdp(False) for every run, ours and TRL alike",
    )


def parse(ap, argv=None):
    """parse_args, then apply the settings every run of the script shares (--no-cudnn-sdpa)."""
    a = ap.parse_args(argv)
    if a.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    return a


def card() -> str:
    return torch.cuda.get_device_name(0) if CUDA else "cpu"


def peak_flops() -> float | None:
    name = card()
    for k, v in PEAK_BF16.items():
        if k in name:
            return v
    return None


def build_model(shape: str, vocab: int, seed: int = 0, attn: str = "sdpa"):
    """Random-init LlamaForCausalLM built directly on the device in bf16 (fp32 on CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, **SHAPES[shape])
    cfg._attn_implementation = attn
    dtype = torch.bfloat16 if CUDA else torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(DEV):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.config.use_cache = False
    return model


def shape_flop_params(shape: str, vocab: int) -> int:
    """flop_params of a shape, counted on the meta device (a 4-bit model's packed weights would miscount)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return flop_params(LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **SHAPES[shape])))


def save_random_model(shape: str, vocab: int, tok_dir: str, out: str) -> str:
    """The random-init bf16 model of build_model saved once (with the tokenizer), for paths that load from
    disk: bitsandbytes 4-bit (ours and TRL) and Unsloth."""
    import shutil

    path = Path(out)
    if not (path / "config.json").exists():
        model = build_model(shape, vocab)
        tmp = path.with_name(path.name + ".tmp")
        model.save_pretrained(tmp)
        for f in Path(tok_dir).iterdir():
            shutil.copy(f, tmp / f.name)
        del model
        free()
        tmp.rename(path)
    return str(path)


def flop_params(model) -> int:
    n = sum(p.numel() for p in model.parameters())
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return n if emb is head or emb.data_ptr() == head.data_ptr() else n - emb.numel()


def parse_hh(t: str) -> list[dict]:
    parts = re.split(r"\n\n(Human|Assistant): ", t)
    return [
        {"role": "user" if parts[i] == "Human" else "assistant", "content": parts[i + 1].strip()}
        for i in range(1, len(parts) - 1, 2)
    ]


def hh_rows(path: str, n: int = 400) -> list[dict]:
    """The anchor's rows: conversational prompt / chosen / rejected (first n usable pairs)."""
    rows = []
    with gzip.open(path, "rt") as f:
        for line in f:
            d = json.loads(line)
            c, r = parse_hh(d["chosen"]), parse_hh(d["rejected"])
            if len(c) < 2 or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
                continue
            rows.append({"prompt": c[:-1], "chosen": [c[-1]], "rejected": [r[-1]]})
    return rows[:n]


def free():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()


def summarize(stamps: list[float], cum_tokens: list[float], peak: float, n_flop: int) -> dict:
    """stamps[k], cum_tokens[k]: time and cumulative tokens at the end of step k+1."""
    n = len(stamps)
    dt = (stamps[-1] - stamps[1]) / (n - 2)
    tok = (cum_tokens[-1] - cum_tokens[1]) / (stamps[-1] - stamps[1])
    iv = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    tk = [b - a for a, b in zip(cum_tokens[1:], cum_tokens[2:])]

    def med(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else sum(xs[len(xs) // 2 - 1 : len(xs) // 2 + 1]) / 2

    pf = peak_flops()
    return {
        "s_per_step": round(dt, 4),
        "tok_per_s": round(tok, 1),
        "s_per_step_median": round(med(iv), 4),
        "tok_per_s_median": round(med([t / i for t, i in zip(tk, iv)]), 1),
        "tok_per_step": round((cum_tokens[-1] - cum_tokens[1]) / (n - 2), 1),
        "peak_gib": round(peak, 2),
        "mfu": round(6 * n_flop * tok / pf, 4) if pf else None,
    }


def held_memory(model, when: str) -> dict:
    """What stays allocated between steps, for splitting a peak into held state and the step's own working memory:
    the trainable (adapter) parameters as the run holds them, counted from the model, and the card's allocation
    `when` ("start": before the first step; "step1": after the first optimizer step, with its moments made)."""
    out = {f"allocated_{when}_gib": round(torch.cuda.memory_allocated() / 2**30, 3) if CUDA else 0.0}
    if when == "start":
        train = [p for p in model.parameters() if p.requires_grad]
        out["trainable_params"] = sum(p.numel() for p in train)
        out["trainable_dtypes"] = sorted({str(p.dtype).removeprefix("torch.") for p in train})
        out["trainable_gib"] = round(sum(p.numel() * p.element_size() for p in train) / 2**30, 3)
    return out


# ---------------------------------------------------------------- ecliptica
def run_ours(
    method: str,
    shape: str,
    gc_on: bool,
    steps: int,
    data: str,
    tok: str,
    vocab: int,
    mb: int = 2,
    ga: int = 4,
    optimizer: str = "adamw",
    grit: dict | None = None,
    chunk: int | None = None,
    tag: str = "",
    attn: str = "sdpa",
    tokens: int | None = None,
    train_extra: dict | None = None,
    model_dir: str | None = None,
    hooks=None,
    fp32: bool = False,
) -> dict:
    """The engine with its defaults (micro_batch_tokens auto, packed_attention auto) unless `tokens` or
    `train_extra` (train-section keys) say otherwise. `model_dir`: a saved random-init model loaded in 4-bit
    through the real path instead of the bf16 model built in memory. `hooks(trainer)`: called after setup.
    `fp32`: the same bf16-initialised weights cast to fp32 and run without autocast (an exactness reference)."""
    import ecliptica.train.engine as E
    from ecliptica.config import TrainConfig
    from ecliptica.losses.registry import settings_for

    train = {
        "max_steps": steps,
        "micro_batch_size": mb,
        "grad_accum": ga,
        "progress": False,
        "mixed_precision": "bf16" if CUDA and not fp32 else "no",
    }
    if chunk:
        train["logp_chunk_size"] = chunk
    if tokens:  # same 8 pairs per step, re-split into micro-batches of at most `tokens` packed tokens
        train["micro_batch_tokens"] = tokens
    train.update(train_extra or {})
    opt = {"name": optimizer, "lr": 5e-6}
    if grit:
        opt["grit"] = grit
    cfg = TrainConfig.model_validate(
        {
            "run_dir": f"/tmp/ecl_bench/{method}_{shape}_{int(gc_on)}_{optimizer}{tag}",
            "seed": 3407,
            "model": {
                "name": model_dir or tok,
                "dtype": "bf16" if CUDA and not fp32 else "fp32",
                "gradient_checkpointing": gc_on,
                "attn_implementation": "sdpa",
                "load_in_4bit": bool(model_dir),
            },
            "lora": {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": TARGETS},
            "data": {
                "path": data,
                "format": "hh-rlhf",
                "on_bad_row": "skip",
                "limit": 400,
                "max_length": 1024,
                "max_prompt_length": 512,
            },
            # the keys this method has (SFT has no beta: a typed config rejects it)
            "method": {"name": method, **settings_for(method, {"beta": 0.1})},
            "optimizer": opt,
            "schedule": {"name": "linear"},
            "train": train,
        }
    )
    built = {}

    def fake_load_model(mcfg, device_map=None):
        built["m"] = build_model(shape, vocab, attn=attn)
        return built["m"].float() if fp32 else built["m"]

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # one process, runs of different precisions
    saved = E.load_model
    if not model_dir:
        E.load_model = fake_load_model
    try:
        # a benchmark always starts fresh: an earlier invocation on this machine left the same run dir behind
        tr = E.Trainer(cfg, overwrite=True).setup()
    finally:
        E.load_model = saved
    n_flop = flop_params(built.pop("m")) if not model_dir else shape_flop_params(shape, vocab)
    if hooks:
        hooks(tr)
    stamps, cum = [], [0.0]
    # a dict, not names: cleared below so the bound method and the policy free the Trainer
    inner = {"step": tr.train_step, "policy": tr.policy}
    held: dict = {}

    def timed(step):
        if not stamps:
            held.update(held_memory(inner["policy"], "start"))
        r = inner["step"](step)
        if CUDA:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        cum.append(cum[-1] + r.tokens)
        if len(stamps) == 1:
            held.update(held_memory(inner["policy"], "step1"))
        return r

    tr.train_step = timed
    tr.train()  # resets the peak-memory counter right before the loop
    peak = torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0
    res = summarize(stamps, cum[1:], peak, n_flop)
    res.update(
        {
            "micro_batch_tokens": tr.micro_batches.tokens,
            "micro_batch_rule": tr.micro_batches.rule,
            "packed_attention": tr.packed_attention,
            "compiled_layers": tr.compiled_layers,
            "fused_lora_layers": tr.fused_lora_layers,
            "nf4_kernel": tr.nf4_kernel,
            "offload_activations": tr.offload_activations,
            **held,
        }
    )
    inner.clear()  # the bound method holds the Trainer and its model; a leak here inflated later runs' peaks
    del tr, timed
    free()
    return res


def record_grit(seen: dict, after_step=None):
    """`hooks` for run_ours that keep GRIT's own evidence that it acted: its scalars after each step
    (seen["grit_steps"]; the last in seen["grit_metrics"]), its summary block (seen["grit_summary"]) and, with
    `after_step`, what after_step(trainer) returns after each step (seen["after_step"], the last one)."""

    def hooks(trainer):
        step, finish = trainer.train_step, trainer._finish
        seen.update(grit_steps=[], grit_summary=None)

        def recording(i):
            r = step(i)
            seen["grit_steps"].append(
                {k: v for k, v in r.metrics.items() if k.startswith("grit/") and "/" not in k[5:]}
            )
            seen["grit_metrics"] = seen["grit_steps"][-1]
            if after_step is not None:
                seen["after_step"] = after_step(trainer)
            return r

        def finishing(last):
            out = finish(last)
            seen["grit_summary"] = out.get("grit")
            return out

        trainer.train_step, trainer._finish = recording, finishing

    return hooks


# ---------------------------------------------------------------- TRL
def run_trl(
    method: str,
    shape: str,
    gc_on: bool,
    steps: int,
    rows: list[dict],
    tok_dir: str,
    vocab: int,
    mb: int = 2,
    ga: int = 4,
    model_dir: str | None = None,
) -> dict:
    """TRL DPOTrainer (method dpo) or SFTTrainer (method sft), configured as /work/shared/bench/trl_dpo_anchor.py.
    `model_dir`: the saved random-init model loaded in bitsandbytes NF4 (TRL prepares it for k-bit training)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback

    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.pad_token = tok.pad_token or tok.eos_token

    class Timer(TrainerCallback):
        def __init__(self):
            self.t, self.held = [], {}

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.held.update(held_memory(model, "start"))

        def on_step_end(self, args, state, control, model=None, **kw):
            if CUDA:
                torch.cuda.synchronize()
            self.t.append(time.perf_counter())
            if len(self.t) == 1:
                self.held.update(held_memory(model, "step1"))

    if model_dir:
        model, n_flop = load_4bit(model_dir), shape_flop_params(shape, vocab)
    else:
        model = build_model(shape, vocab)
        n_flop = flop_params(model)
    peft = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    common = dict(
        output_dir=f"/tmp/trl_bench/{method}_{shape}_{int(gc_on)}",
        per_device_train_batch_size=mb,
        gradient_accumulation_steps=ga,
        max_steps=steps,
        learning_rate=5e-6,
        bf16=CUDA,
        use_cpu=not CUDA,
        max_length=1024,
        logging_steps=1,
        report_to="none",
        gradient_checkpointing=gc_on,
        save_strategy="no",
        seed=3407,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    timer = Timer()
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        tr = DPOTrainer(
            model=model,
            args=DPOConfig(beta=0.1, **common),
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            peft_config=peft,
            callbacks=[timer],
        )
    elif method == "sft":
        from trl import SFTConfig, SFTTrainer

        sft_rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
        tr = SFTTrainer(
            model=model,
            args=SFTConfig(**common),
            train_dataset=Dataset.from_list(sft_rows),
            processing_class=tok,
            peft_config=peft,
            callbacks=[timer],
        )
    else:
        raise ValueError(method)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    tr.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0
    cum = [float(h["num_tokens"]) for h in tr.state.log_history if "num_tokens" in h]
    assert len(cum) == len(timer.t) == steps, (len(cum), len(timer.t), steps)
    res = {**summarize(timer.t, cum, peak, n_flop), **timer.held}
    del tr, model, timer
    free()
    return res


def load_4bit(model_dir: str):
    """NF4 + double quantisation, bf16 compute: the settings of ecliptica.models for load_in_4bit."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=q, dtype=torch.bfloat16, device_map={"": 0}, attn_implementation="sdpa"
    )
    model.config.use_cache = False
    return model


def versions() -> dict:
    import peft
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    for name in ("trl", "bitsandbytes"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def out_dirs(default: str) -> list[Path]:
    """Results go to --results (default runs/benchmarks/, git-ignored) and, on the device machine, also to $OUT
    (which comes back). Sets worth keeping are committed under results/benchmarks/ and listed in results/README.md."""
    dirs = [Path(default)]
    if os.environ.get("OUT"):
        dirs.append(Path(os.environ["OUT"]))
    return dirs
