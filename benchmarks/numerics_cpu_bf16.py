"""On the CPU, in bf16: is a speed path further from the exact (fp32) computation than the plain eager bf16 path?

The GPU check (verify_kernels.py) compares on Triton kernels; this one isolates what the engine itself does
(micro-batch split, compiled layers) from the card: a random 4-layer Llama (hidden 256, GQA 8/2, bf16 weights),
DPO, 2 pairs x grad-accum 4, 4 steps, lr 1e-4, no clipping, CPU autocast bf16, the LoRA gradient captured before
every optimizer step. Paths: reference (2 x 4, eager), repeat, fp32 (the same weights in fp32, no autocast),
compile (2 x 4, compiled layers), whole_step (one micro-batch per step, eager), default_like (whole step +
compiled). Slow: about 6 min per bf16 path on 2 cores.

    PYTHONPATH=src python benchmarks/numerics_cpu_bf16.py --data HH.jsonl.gz --tok TOKENIZER_DIR [--paths ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from verify_kernels import capture_grads, compare  # noqa: E402

PATHS = {
    "reference": dict(dtype="bf16", mp="bf16", tokens=None, comp="off"),
    "repeat": dict(dtype="bf16", mp="bf16", tokens=None, comp="off"),
    "fp32": dict(dtype="fp32", mp="no", tokens=None, comp="off"),
    "compile": dict(dtype="bf16", mp="bf16", tokens=None, comp="on"),
    "whole_step": dict(dtype="bf16", mp="bf16", tokens=100000, comp="off"),
    "default_like": dict(dtype="bf16", mp="bf16", tokens=100000, comp="on"),
}


def build_model(out: Path, tok: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    for f in tok.iterdir():  # the tokenizer and chat template only
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
            shutil.copy(f, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="HH-RLHF jsonl(.gz)")
    ap.add_argument("--tok", required=True, help="a tokenizer dir with a chat template (e.g. the embedded model's)")
    ap.add_argument("--work", default="/tmp/ecl_numerics")
    ap.add_argument("--method", default="dpo")
    ap.add_argument("--paths", default="reference,repeat,fp32,compile,whole_step,default_like")
    a = ap.parse_args()
    from accelerate.state import AcceleratorState

    from ecliptica.config import TrainConfig
    from ecliptica.train.engine import Trainer

    work = Path(a.work)
    model_dir = work / "model"
    if not (model_dir / "config.json").exists():
        build_model(model_dir, Path(a.tok))
    names = a.paths.split(",")
    order = ["reference"] + (["fp32"] if "fp32" in names else []) + [p for p in names if p not in ("reference", "fp32")]
    runs = {}
    for name in order:
        p = PATHS[name]
        AcceleratorState._reset_state(reset_partial_state=True)  # precisions change between runs
        rd = work / f"run_{a.method}_{name}"
        cfg = TrainConfig.model_validate(
            {
                "run_dir": str(rd),
                "seed": 3,
                "model": {"name": str(model_dir), "dtype": p["dtype"]},
                "lora": {"r": 16, "alpha": 16, "dropout": 0.0},
                "method": {"name": a.method, **({"lambda_kl": 0.05} if a.method == "cita" else {})},
                "data": {
                    "path": a.data,
                    "format": "hh-rlhf",
                    "on_bad_row": "skip",
                    "limit": 64,
                    "max_length": 256,
                    "max_prompt_length": 128,
                },
                "optimizer": {"lr": 1e-4},
                "schedule": {"name": "linear"},
                "train": {
                    "max_steps": 4,
                    "micro_batch_size": 2,
                    "grad_accum": 4,
                    "progress": False,
                    "max_grad_norm": None,
                    "mixed_precision": p["mp"],
                    "micro_batch_tokens": p["tokens"],
                    "compile_layers": p["comp"],
                },
            }
        )
        grads: list = []
        t = time.time()
        tr = Trainer(cfg, overwrite=True).setup()
        capture_grads(grads)(tr)
        tr.train()
        losses = [json.loads(x)["loss"] for x in (rd / "metrics.jsonl").read_text().splitlines()]
        runs[name] = {"losses": losses, "grads": grads}
        row = {"path": name, "s": round(time.time() - t, 1), "losses": [round(x, 5) for x in losses]}
        if name != "reference":
            row["vs_reference"] = compare(runs["reference"], runs[name])
        if "fp32" in runs and name != "fp32":
            row["vs_fp32"] = compare(runs["fp32"], runs[name])
        print("NUMERICS", json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
