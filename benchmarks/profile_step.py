"""Where an ecliptica optimizer step spends its time (diagnostic for benchmarks/bench_throughput.py).

  PYTHONPATH=src python benchmarks/profile_step.py --shape llama3.2-1b --methods dpo,cita

Builds the same Trainer as the throughput benchmark, runs warm-up steps, then profiles two steps with
torch.profiler and prints the top operators by host (CPU) time and by device time, plus per-step wall times
for packed and padded batches.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def trainer(method, shape, vocab, data, tok, packing=True, gc_on=False, steps=8):
    import ecliptica.train.engine as E
    from ecliptica.config import TrainConfig

    cfg = TrainConfig.model_validate(
        {
            "run_dir": f"/tmp/ecl_prof/{method}_{int(packing)}",
            "seed": 3407,
            "model": {"name": tok, "dtype": "bf16" if C.CUDA else "fp32", "gradient_checkpointing": gc_on},
            "lora": {"r": 16, "alpha": 16, "target_modules": C.TARGETS},
            "data": {"path": data, "format": "hh-rlhf", "on_bad_row": "skip", "limit": 400},
            "method": {"name": method},
            "optimizer": {"name": "adamw", "lr": 5e-6},
            "train": {
                "max_steps": steps,
                "micro_batch_size": 2,
                "grad_accum": 4,
                "progress": False,
                "packing": packing,
                "mixed_precision": "bf16" if C.CUDA else "no",
            },
        }
    )
    saved = E.load_model
    E.load_model = lambda m, device_map=None: C.build_model(shape, vocab)
    try:
        tr = E.Trainer(cfg, overwrite=True).setup()
    finally:
        E.load_model = saved
    tr.nonfinite_skipped, tr.train_tokens, tr.train_seconds = 0, 0, 0.0
    tr.policy.train()
    return tr


def step_times(tr, steps):
    out = []
    for s in range(steps):
        t = time.perf_counter()
        tr.train_step(s)
        if C.CUDA:
            torch.cuda.synchronize()
        out.append(round(time.perf_counter() - t, 4))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=".carry/hh_test.jsonl.gz")
    ap.add_argument("--tok", default=".carry/tok")
    ap.add_argument("--shape", default="llama3.2-1b")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--methods", default="dpo,cita")
    ap.add_argument("--rows", type=int, default=22)
    a = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    for method in a.methods.split(","):
        for packing in (True, False):
            tr = trainer(method, a.shape, a.vocab, a.data, a.tok, packing=packing)
            print(f"\n=== {method} packing={packing}: step times", step_times(tr, 6), flush=True)
            if packing:
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if C.CUDA else [])
                with profile(activities=acts) as prof:
                    step_times(tr, 2)
                print(
                    prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=60)
                )
                if C.CUDA:
                    print(
                        prof.key_averages().table(
                            sort_by="self_cuda_time_total", row_limit=a.rows, max_name_column_width=60
                        )
                    )
            del tr
            C.free()


def diag(a):
    """Order test (cita, dpo, cita, dpo in one process) with a per-phase split and Python GC pause time."""
    import gc

    pause = {"t": 0.0, "n": 0, "start": 0.0}

    def cb(phase, info):
        if phase == "start":
            pause["start"] = time.perf_counter()
        else:
            pause["t"] += time.perf_counter() - pause["start"]
            pause["n"] += 1 if info.get("generation") == 2 else 0

    gc.callbacks.append(cb)
    for method in a.order.split(","):
        tr = trainer(method, a.shape, a.vocab, a.data, a.tok)
        step_times(tr, 3)
        phases = {"fwd": 0.0, "bwd": 0.0}
        inner = {"micro": tr.micro_step, "bwd": tr.accelerator.backward}  # cleared below: they hold the Trainer

        def micro(idx, progress):
            t = time.perf_counter()
            out = inner["micro"](idx, progress)
            if C.CUDA:
                torch.cuda.synchronize()
            phases["fwd"] += time.perf_counter() - t
            return out

        def bwd(loss, **kw):
            t = time.perf_counter()
            inner["bwd"](loss, **kw)
            if C.CUDA:
                torch.cuda.synchronize()
            phases["bwd"] += time.perf_counter() - t

        tr.micro_step, tr.accelerator.backward = micro, bwd
        pause.update(t=0.0, n=0)
        st = step_times(tr, 5)
        print(
            f"DIAG {method}: steps {st} fwd+loss {phases['fwd'] / 5:.3f} s/step bwd {phases['bwd'] / 5:.3f} s/step "
            f"gc pause {pause['t'] / 5:.3f} s/step (gen2 collections {pause['n']})",
            flush=True,
        )
        inner.clear()
        del tr, micro, bwd
        C.free()


if __name__ == "__main__" and "--diag" in sys.argv:
    ap = argparse.ArgumentParser()
    ap.add_argument("--diag", action="store_true")
    ap.add_argument("--order", default="cita,dpo,cita,dpo")
    ap.add_argument("--data", default=".carry/hh_test.jsonl.gz")
    ap.add_argument("--tok", default=".carry/tok")
    ap.add_argument("--shape", default="llama3.2-1b")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--no-cudnn-sdpa", action="store_true", help="torch.backends.cuda.enable_cudnn_sdp(False)")
    args = ap.parse_args()
    if args.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    print("cudnn sdpa enabled:", torch.backends.cuda.cudnn_sdp_enabled(), flush=True)
    diag(args)


if __name__ == "__main__" and "--diag" not in sys.argv:
    main()
