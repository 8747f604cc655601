"""GPU check that every speed path computes what the reference path computes: per-step losses and the LoRA
gradient of every step, for a few steps, within bf16 tolerance.

Paths (each is the real engine on the same random-init model, data, seed and 8 pairs per step):
  reference   micro_batch_size x grad_accum (2 x 4), dense block mask, eager layers: the plain path every
              speed-up must match
  repeat      the reference again: the run-to-run noise floor of bf16 kernels on this card
  varlen      2 x 4, variable-length FlashAttention (train/attention.py)
  flex        2 x 4, FlexAttention document masking (train/attention.py)
  compile     2 x 4, dense mask, regionally compiled decoder layers (train/compile.py)
  fusedlora   2 x 4, dense mask, eager, the fused LoRA projection (train/fused_lora.py)
  auto        micro_batch_tokens auto (train/sizing.py), dense mask, eager
  default     no knob set: auto sizing + auto attention (varlen) + compiled layers
  nf4bnb      4-bit only: 2 x 4, dense mask, compiled layers, bitsandbytes' NF4 ops (train.nf4_kernel)
  nf4torch    4-bit only: the same with the NF4 dequantisation in torch ops (train/nf4.py)
  fp32        the reference path in fp32 (same bf16-initialised weights, no autocast): the exact computation.
              When it is run, a path also passes if its distance to fp32 is at most --truth-factor x the
              reference's own distance to fp32: a kernel that rounds differently but no worse than eager bf16.
With --4bit every path loads the same saved random-init model in NF4 (bitsandbytes), the reference included (whose
eager layers use bitsandbytes' ops), and the script first compares train/nf4.py's dequantisation, eager and
compiled, with bitsandbytes' dequantize_4bit for every 4-bit weight (counts of differing values).
Gradient clipping is off so the captured gradient is the raw one. FlexAttention has no backward on CPU and varlen
no CPU kernel, so their gradients are only checked here (tests/train/test_attention.py checks flex's forward and
everything around the varlen kernel on CPU; tests/train/test_compile.py checks the compiled layers on CPU).

    PYTHONPATH=src python3 benchmarks/verify_kernels.py --shape llama3.2-1b --methods dpo,cita --gc off,on
Prints one line per (method, gc, path) and writes verify_kernels.json (to $OUT as well when set).
Exit status 1 when any path is outside tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

OFF = {
    "micro_batch_tokens": None,
    "packed_attention": "dense",
    "compile_layers": "off",
    "offload_activations": "off",
    "fused_lora": "off",
}
PATHS = {
    "reference": OFF,
    "repeat": OFF,
    "varlen": {**OFF, "packed_attention": "varlen"},
    "flex": {**OFF, "packed_attention": "flex"},
    "compile": {**OFF, "compile_layers": "on"},
    "offload": {**OFF, "offload_activations": "on"},  # needs --gc on
    "fusedlora": {**OFF, "fused_lora": "on"},
    "auto": {**OFF, "micro_batch_tokens": "auto"},
    "default": {},  # what a config gets with no knob set: auto sizing, auto attention, auto compile
    "nf4bnb": {**OFF, "compile_layers": "on", "nf4_kernel": "bitsandbytes"},  # --4bit only
    "nf4torch": {**OFF, "compile_layers": "on", "nf4_kernel": "torch"},  # --4bit only
    "fp32": OFF,  # the reference path with the same weights in fp32, no autocast: what bf16 approximates
}


def capture_grads(store: list):
    """A run_ours hook: keep the flattened LoRA gradient (fp32, on the host) before every optimizer step."""

    def hook(tr):
        real = tr.optimizer.step
        params = [p for p in tr.policy.parameters() if p.requires_grad]

        def step(*args, **kwargs):
            store.append(
                torch.cat(
                    [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten() for p in params]
                ).cpu()
            )
            return real(*args, **kwargs)

        tr.optimizer.step = step

    return hook


def check_dequantisation(model_dir: str) -> dict:
    """train/nf4.py's dequantisation (eager and compiled) against bitsandbytes' for every 4-bit weight of the
    saved model loaded in NF4: how many values differ, and the largest difference."""
    import bitsandbytes.functional as BF
    from bitsandbytes.nn import Linear4bit

    from ecliptica.config import InferenceModelSection
    from ecliptica.models import load_model
    from ecliptica.train.nf4 import dequantize_args, dequantize_nf4, unsupported_reason

    model = load_model(InferenceModelSection(name=model_dir, load_in_4bit=True))
    compiled = torch.compile(dequantize_nf4, dynamic=True)
    out = {"weights": 0, "values": 0, "differ_eager": 0, "differ_compiled": 0, "max_abs_diff": 0.0}
    for name, m in model.named_modules():
        if not isinstance(m, Linear4bit):
            continue
        assert unsupported_reason(m) is None, (name, unsupported_reason(m))
        ref = BF.dequantize_4bit(m.weight.data, m.weight.quant_state).to(m.compute_dtype)
        args = dequantize_args(m)
        for key, fn in (("differ_eager", dequantize_nf4), ("differ_compiled", compiled)):
            got = fn(*args)
            out[key] += int((got != ref).sum())
            out["max_abs_diff"] = max(out["max_abs_diff"], float((got.float() - ref.float()).abs().max()))
        out["weights"] += 1
        out["values"] += ref.numel()
    del model
    C.free()
    return out


def compare(ref: dict, run: dict) -> dict:
    """Worst step's loss and gradient distances. The gradients (tens of millions of values) are compared in float64:
    an fp32 dot product that long gains 1e-3 (a 1B CITA gradient read a cosine of 1.0016 in fp32)."""
    loss_rel = max(abs(a - b) / max(abs(a), 1e-8) for a, b in zip(ref["losses"], run["losses"]))
    pairs = [(g.double(), r.double()) for g, r in zip(run["grads"], ref["grads"])]
    grad_rel = max(float((g - r).norm() / r.norm().clamp_min(1e-300)) for g, r in pairs)
    cos = min(float(g @ r / (g.norm() * r.norm()).clamp_min(1e-300)) for g, r in pairs)
    return {"max_loss_rel_diff": loss_rel, "max_grad_rel_l2": grad_rel, "min_grad_cosine": cos}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(ap)
    ap.add_argument("--shape", default="llama3.2-1b")
    ap.add_argument("--methods", default="dpo,cita")
    ap.add_argument("--gc", default="off")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--loss-tol", type=float, default=1e-2, help="max relative loss difference (bf16)")
    ap.add_argument("--grad-tol", type=float, default=5e-2, help="max relative L2 gradient difference (bf16)")
    ap.add_argument(
        "--truth-factor",
        type=float,
        default=1.25,
        help="with the fp32 path: pass when no further from fp32 than this x the bf16 reference",
    )
    ap.add_argument(
        "--4bit",
        dest="four_bit",
        action="store_true",
        help="every path on the saved random-init model loaded in NF4 (needs bitsandbytes)",
    )
    ap.add_argument("--model-cache", default="/tmp/ecl_bench_models", help="where --4bit saves the random-init model")
    ap.set_defaults(steps=4)
    a = C.parse(ap)
    paths = a.paths.split(",")
    if a.four_bit and "fp32" in paths:
        ap.error("--4bit has no fp32 path (the NF4 weights are the model)")
    if not a.four_bit and {"nf4bnb", "nf4torch"} & set(paths):
        ap.error("the nf4bnb and nf4torch paths need --4bit")
    model_dir = (
        C.save_random_model(a.shape, a.vocab, a.tok, f"{a.model_cache}/{a.shape}_{a.vocab}") if a.four_bit else None
    )
    rows, ok, rows_by = [], True, {}
    dequant = None
    if a.four_bit:
        dequant = check_dequantisation(model_dir)
        print("DEQUANT", json.dumps(dequant), flush=True)
        ok &= dequant["differ_eager"] == 0
    order = ["reference"] + (["fp32"] if "fp32" in paths else []) + [p for p in paths if p not in ("reference", "fp32")]
    for method in a.methods.split(","):
        for gc_on in [g == "on" for g in a.gc.split(",")]:
            runs = {}
            for path in order:
                grads: list = []
                extra = {**PATHS[path], "max_grad_norm": None}
                res = C.run_ours(
                    method,
                    shape=a.shape,
                    gc_on=gc_on,
                    steps=a.steps,
                    data=a.data,
                    tok=a.tok,
                    vocab=a.vocab,
                    tag=f"_verify_{path}",
                    train_extra=extra,
                    hooks=capture_grads(grads),
                    fp32=path == "fp32",
                    model_dir=model_dir,
                )
                run_dir = Path(f"/tmp/ecl_bench/{method}_{a.shape}_{int(gc_on)}_adamw_verify_{path}")
                losses = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
                runs[path] = {"losses": losses, "grads": grads}
                row = {
                    "method": method,
                    "gc": gc_on,
                    "path": path,
                    "losses": losses,
                    "micro_batch_tokens": res["micro_batch_tokens"],
                    "packed_attention": res["packed_attention"],
                    "compiled_layers": res["compiled_layers"],
                    "nf4_kernel": res.get("nf4_kernel"),
                    "tok_per_s": res["tok_per_s"],
                    "peak_gib": res["peak_gib"],
                }
                if path != "reference":
                    row.update(compare(runs["reference"], runs[path]))
                    row["pass"] = row["max_loss_rel_diff"] <= a.loss_tol and row["max_grad_rel_l2"] <= a.grad_tol
                if path == "fp32":  # the reference ran first; its own distance to the truth is the yardstick
                    ref_row = rows_by[(method, gc_on, "reference")]
                    ref_row.update({f"fp32_{k}": v for k, v in compare(runs["fp32"], runs["reference"]).items()})
                    print("VERIFY", json.dumps(ref_row), flush=True)
                if "fp32" in runs and path not in ("fp32", "reference"):
                    truth = {f"fp32_{k}": v for k, v in compare(runs["fp32"], runs[path]).items()}
                    row.update(truth)
                    ref_dist = rows_by[(method, gc_on, "reference")]["fp32_max_grad_rel_l2"]
                    row["no_worse_than_bf16_reference"] = truth["fp32_max_grad_rel_l2"] <= a.truth_factor * ref_dist
                    row["pass"] = row["pass"] or row["no_worse_than_bf16_reference"]
                if path not in ("reference", "fp32"):
                    ok &= row["pass"]
                rows_by[(method, gc_on, path)] = row
                rows.append(row)
                print("VERIFY", json.dumps(row), flush=True)
            del runs
    out = {
        "card": C.card(),
        "versions": C.versions(),
        "shape": a.shape,
        "steps": a.steps,
        "four_bit": a.four_bit,
        "dequantisation": dequant,
        "loss_tol": a.loss_tol,
        "grad_tol": a.grad_tol,
        "rows": rows,
        "all_pass": ok,
    }
    for d in C.out_dirs(a.results):
        C.write_json(d / "verify_kernels.json", out)
    print("ALL PASS" if ok else "SOME PATHS OUTSIDE TOLERANCE", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
