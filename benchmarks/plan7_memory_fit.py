"""Does every trained arm of the plan7 study fit a 22 GB card (A10)?

Builds a random-init Llama-3-8B-shaped model (vocab 128,256), saves it once so that the real loading
path runs (`load_in_4bit: true` -> bitsandbytes NF4, `models.apply_lora`, LoRA), then
trains each arm of `configs/study_plan7_llama3_8b.yaml` for a few steps with its own settings (batch 2 x 4,
max length 1024, gradient checkpointing, GRIT as configured) on worst-case data: every sequence is
truncated to the full 1024 tokens (768 prompt + 256 response), so no real batch can need more.
GRIT's reprojection is moved into the measured window. Reports the peak allocated and reserved memory
of each arm (reserved is what the card must hold).

    python benchmarks/plan7_memory_fit.py --tokenizer .carry/tok --steps 4 --out results.json
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import time
from pathlib import Path

import torch

GIB = 2**30
A10_BYTES = 22e9  # "22 GB": the A10's 24 GB board minus what the driver and CUDA context take


def worst_case_pairs(path: Path, n: int, seed: int = 0) -> None:
    """Pairs whose prompt and responses are all longer than the truncation limits."""
    rng = random.Random(seed)
    words = "the a safe request answer model people harm help question policy because then".split()
    text = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    with path.open("w") as f:
        for i in range(n):
            f.write(
                json.dumps({"id": f"w{i}", "prompt": text(1200), "chosen": text(600), "rejected": text(600)}) + "\n"
            )


def save_random_model(out: Path, tokenizer: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return
    cfg = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    for f in tokenizer.iterdir():
        shutil.copy(f, tmp / f.name)
    del model
    torch.cuda.empty_cache()
    tmp.rename(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True, help="a tokenizer directory (ids < 128,256)")
    ap.add_argument("--study", default="configs/study_plan7_llama3_8b.yaml")
    ap.add_argument("--work", default="/tmp/plan7_fit")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--arms", default="", help="comma-separated arm names (default: every trained arm)")
    ap.add_argument("--out", default="plan7_memory_fit.json")
    ap.add_argument(
        "--memory-budget-gib",
        type=float,
        default=20.4,
        help="micro_batch_tokens auto sizes to this peak, as it would on the 22 GB card itself",
    )
    a = ap.parse_args()

    from ecliptica.study.runner import load_study
    from ecliptica.train import Trainer

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    save_random_model(work / "llama3-8b-random", Path(a.tokenizer))
    print(f"random model saved in {time.time() - t0:.0f} s", flush=True)
    data = work / "worst_case.jsonl"
    worst_case_pairs(data, 64)
    study = load_study(
        a.study,
        [
            f"study_dir={work / 'study'}",
            f"train.model.name={work / 'llama3-8b-random'}",
            f"train.data.path={data}",
            "train.data.format=generic",
            "train.data.on_bad_row=error",
            f"train.train.max_steps={a.steps}",
            "train.train.save_every=1000",
            "train.train.log_every=1",
            "train.train.progress=false",
            f"train.train.memory_budget_gib={a.memory_budget_gib}",
            "grit.reproject_warmup=1",
            f"grit.reproject_steps={max(a.steps - 2, 1)}",
        ],
    )
    wanted = set(a.arms.split(",")) if a.arms else None
    results = []
    for arm in study.arms:
        if arm.method == "baseline" or (wanted and arm.name not in wanted):
            continue
        cfg = study.arm_config(arm, study.seeds[0])
        torch.cuda.empty_cache()
        t = time.time()
        tr = Trainer(cfg).setup()
        torch.cuda.reset_peak_memory_stats()
        tr.train()
        summary = tr.summary
        row = {
            "arm": arm.name,
            "method": arm.method,
            "optimizer": arm.optimizer,
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2),
            "tokens_per_step": round(summary.train_tokens / summary.steps),
            "seconds": round(time.time() - t, 1),
        }
        row["fits_22gb"] = torch.cuda.max_memory_reserved() < A10_BYTES
        print(json.dumps(row), flush=True)
        results.append(row)
        del tr
        gc.collect()
        torch.cuda.empty_cache()
    out = {
        "card": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "steps": a.steps,
        "settings": {k: study.train[k] for k in ("model", "lora", "train")},
        "arms": results,
    }
    import bitsandbytes
    import peft
    import transformers

    out["versions"] = {
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
    }
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
