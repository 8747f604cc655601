"""Same config on 1 process and on N processes (accelerate launch) with the same global batch: compare the
per-step losses. Builds a small random Llama (no weights to download) with the SmolLM2 tokenizer, trains DPO
on the bundled demo pairs.

    python benchmarks/multi_gpu_equivalence.py --tokenizer TOKDIR --out OUTDIR [--procs 2] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def build_model(tok_dir: Path, out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    for f in tok_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def train(model: Path, run_dir: Path, procs: int, global_batch: int, dtype: str, steps: int) -> list[float]:
    sets = [
        f"run_dir={run_dir}",
        f"model.name={model}",
        f"model.dtype={dtype}",
        "method.name=dpo",
        f"train.max_steps={steps}",
        f"train.micro_batch_size={global_batch // procs}",
        "train.grad_accum=1",
        f"train.mixed_precision={'bf16' if dtype == 'bf16' else 'no'}",
        "train.progress=false",
        "optimizer.lr=1e-3",
        "schedule.name=constant",
        "lora.r=8",
        "data.max_length=384",
    ]
    args = ["-m", "ecliptica.cli", "train", "configs/train_demo_dpo.yaml"] + [x for s in sets for x in ("--set", s)]
    if procs == 1:
        cmd = [sys.executable] + args
    else:
        import torch

        if torch.cuda.is_available():
            cmd = [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--num_processes",
                str(procs),
                "--multi_gpu",
                "--mixed_precision",
                "bf16" if dtype == "bf16" else "no",
            ] + args
        else:  # a CPU (gloo) check of this script and of the engine's data-parallel path
            os.environ["ACCELERATE_USE_CPU"] = "true"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)] + args
    subprocess.run(cmd, check=True)
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dtype", default="bf16")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    model = build_model(a.tokenizer, a.out / "model")
    one = train(model, a.out / "run_1proc", 1, a.global_batch, a.dtype, a.steps)
    many = train(model, a.out / f"run_{a.procs}proc", a.procs, a.global_batch, a.dtype, a.steps)
    diff = [abs(x - y) for x, y in zip(one, many)]
    result = {
        "procs": a.procs,
        "global_batch": a.global_batch,
        "dtype": a.dtype,
        "losses_1proc": one,
        f"losses_{a.procs}proc": many,
        "max_abs_diff": max(diff),
        "max_rel_diff": max(d / abs(x) for d, x in zip(diff, one)),
    }
    print(json.dumps(result, indent=1))
    (a.out / "multi_gpu_equivalence.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
