"""Unsloth's recipe (the seed plan's stack): `FastLanguageModel` + TRL `DPOTrainer`, timed as _common.run_trl
times TRL, on the saved random-init model of the same shape, the same HH-RLHF rows, 2 pairs x grad-accum 4,
max length 1024, LoRA r16/alpha16/dropout 0 on the 7 projections, bf16.

Unsloth pins its own trl/transformers/datasets and patches them on import, so it runs in its own process
with its own install target first on PYTHONPATH; bench_throughput.py --unsloth-site DIR starts this script
and reads its `UNSLOTH {json}` line. Any failure (including features that need the network) is reported
in that line as {"error": ...}.

    PYTHONPATH=/tmp/unsloth_site:benchmarks python benchmarks/unsloth_dpo.py --model-dir M --gc on [--4bit]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--data", default=".carry/hh_test.jsonl.gz")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--gc", choices=["on", "off"], default="on")
    ap.add_argument("--4bit", dest="four_bit", action="store_true")
    a = ap.parse_args()
    try:
        out = run(a)
    except Exception as e:  # not importable, or a feature that does not run offline: record it
        traceback.print_exc()
        out = {"error": repr(e)[:300]}
    print("UNSLOTH " + json.dumps(out), flush=True)


def run(a) -> dict:
    import _common as C
    import torch
    import unsloth  # noqa: F401  (first: it patches transformers and trl on import)
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from unsloth import FastLanguageModel

    class Timer(TrainerCallback):
        def __init__(self):
            self.t, self.held = [], {}

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.held.update(C.held_memory(model, "start"))

        def on_step_end(self, args, state, control, model=None, **kw):
            torch.cuda.synchronize()
            self.t.append(time.perf_counter())
            if len(self.t) == 1:
                self.held.update(C.held_memory(model, "step1"))

    gc_on = a.gc == "on"
    model, tok = FastLanguageModel.from_pretrained(
        model_name=a.model_dir,
        max_seq_length=1024,
        dtype=torch.bfloat16,
        load_in_4bit=a.four_bit,
        local_files_only=True,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=C.TARGETS,
        bias="none",
        use_gradient_checkpointing="unsloth" if gc_on else False,
        random_state=3407,
    )
    tok.pad_token = tok.pad_token or tok.eos_token
    args = DPOConfig(
        beta=0.1,
        output_dir="/tmp/unsloth_bench",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        max_steps=a.steps,
        learning_rate=5e-6,
        bf16=True,
        max_length=1024,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=3407,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    timer = Timer()
    tr = DPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=Dataset.from_list(C.hh_rows(a.data)),
        processing_class=tok,
        callbacks=[timer],
    )
    torch.cuda.reset_peak_memory_stats()
    tr.train()
    peak = torch.cuda.max_memory_allocated() / 2**30
    cum = [float(h["num_tokens"]) for h in tr.state.log_history if "num_tokens" in h]
    res = {**C.summarize(timer.t, cum, peak, C.shape_flop_params(a.shape, a.vocab)), **timer.held}
    import transformers
    import trl

    res["versions"] = {"unsloth": unsloth.__version__, "trl": trl.__version__, "transformers": transformers.__version__}
    return res


if __name__ == "__main__":
    main()
