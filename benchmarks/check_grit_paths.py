"""Is GRIT active on every path the engine takes? One short GRIT run per path, through the engine, on the GPU.

  PYTHONPATH=src python benchmarks/check_grit_paths.py --data .carry/hh_test.jsonl.gz --tok .carry/tok
  (CPU smoke test: --shape tiny --vocab 49152 --paths eager,compiled)

Random-init Llama shape (default Llama-3.2-1B), LoRA r16 on the 7 projections, DPO, GRIT with its defaults, the same
pairs in every run. For each path it prints, by GRIT's own state: the share of valid curvature factors after the last
step, the mean damping, the preconditioned/raw gradient ratio, and how far the factors are from the eager
path's after the last step (the 4-bit paths against the eager 4-bit path; relative Frobenius distance over all layers; the runs see the same pairs, and bf16
paths round differently, so a few per cent is expected; step 1's Sigma_g is zero while B is still zero).
A path passes when it trains without error, every factor is valid at the end, the ratio is not 1 (preconditioning
changed the gradient) and its factors are within --tol of the eager path's. Exit status 1 if any path fails.
Writes grit_paths.json to --results (and $OUT when set).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# name: (gradient checkpointing, train-section settings, 4-bit). "default" is what a user gets with no setting.
PATHS = {
    "eager": (False, {"compile_layers": "off", "fused_lora": "off", "packed_attention": "dense"}, False),
    "default": (False, {}, False),
    "default_gc": (True, {}, False),  # checkpointing on: activation offload is on by default with it
    "eager_4bit": (False, {"compile_layers": "off", "fused_lora": "off"}, True),  # bitsandbytes' own ops
    "default_4bit": (False, {}, True),  # NF4 dequantised in torch ops inside the compiled layers
    "compiled_unfused": (False, {"fused_lora": "off"}, False),
    "compiled_dense": (False, {"packed_attention": "dense"}, False),
}


def factor_state(trainer) -> dict:
    """GRIT's factors and validity, read from its banks (the same attributes on older engines)."""
    banks = trainer.optimizer_hooks.banks
    return {
        "a": torch.cat([b.a_ema for b in banks]).float().cpu(),
        "g": torch.cat([b.g_ema for b in banks]).float().cpu(),
        "valid": torch.cat([torch.cat([b.valid_a, b.valid_g]) for b in banks]).float().mean().item(),
    }


def run_path(name: str, a) -> dict:
    gc_on, extra, four_bit = PATHS[name]
    seen: dict = {}
    model_dir = (
        C.save_random_model(a.shape, a.vocab, a.tok, f"/tmp/ecl_bench_models/{a.shape}_{a.vocab}") if four_bit else None
    )
    res = C.run_ours(
        "dpo",
        a.shape,
        gc_on,
        a.steps,
        a.data,
        a.tok,
        a.vocab,
        optimizer="grit",
        tag=f"_paths_{name}",
        train_extra=extra,
        model_dir=model_dir,
        hooks=C.record_grit(seen, after_step=factor_state),
    )
    last = seen["grit_metrics"]
    return {
        "path": name,
        "gc": gc_on,
        "4bit": four_bit,
        **{
            k: res.get(k)
            for k in (
                "packed_attention",
                "compiled_layers",
                "fused_lora_layers",
                "nf4_kernel",
                "offload_activations",
                "s_per_step",
            )
        },
        "valid_share": seen["after_step"]["valid"],
        "damping": last.get("grit/damping"),
        "precond_grad_ratio": last.get("grit/precond_grad_ratio"),
        "_factors": seen["after_step"],
    }


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm()) if float(ref.norm()) > 0 else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(ap)
    ap.add_argument("--shape", default="llama3.2-1b")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--tol", type=float, default=0.1, help="largest factor distance from the eager path that passes")
    ap.set_defaults(steps=4)
    a = C.parse(ap, argv)
    print("card", C.card(), "versions", C.versions(), flush=True)
    rows, eager = [], {}  # the eager path's factors per precision: a 4-bit model is another model
    for name in a.paths.split(","):
        t0 = time.perf_counter()
        try:
            row = run_path(name, a)
        except Exception as e:  # a path that crashes fails; the others still run
            traceback.print_exc()
            row = {"path": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            C.free()
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        first, four_bit = row.pop("_factors", None), PATHS[name][2]
        if name.startswith("eager") and first is not None:
            eager[four_bit] = first
        ref = eager.get(four_bit)
        if first is not None and ref is not None:
            row["factor_a_vs_eager"], row["factor_g_vs_eager"] = rel(first["a"], ref["a"]), rel(first["g"], ref["g"])
        ratio = row.get("precond_grad_ratio")
        row["pass"] = (
            "error" not in row
            and row.get("valid_share") == 1.0
            and ratio is not None
            and abs(ratio - 1.0) > 1e-3
            and (ref is None or max(row.get("factor_a_vs_eager", 0.0), row.get("factor_g_vs_eager", 0.0)) < a.tol)
        )
        rows.append(row)
        print("PATH", json.dumps(row), flush=True)
    obj = {
        "card": C.card(),
        "versions": C.versions(),
        "shape": a.shape,
        "steps": a.steps,
        "paths": rows,
        "all_pass": all(r["pass"] for r in rows),
    }
    for out in C.out_dirs(a.results):
        C.write_json(out / "grit_paths.json", obj)
    print(f"\n{'path':18} {'pass':5} {'valid':>6} {'damping':>9} {'ratio':>10} {'dA':>7} {'dG':>7}  error")
    for r in rows:
        print(
            f"{r['path']:18} {str(r['pass']):5} {r.get('valid_share', float('nan')):6.3f} "
            f"{r.get('damping') or float('nan'):9.2e} {r.get('precond_grad_ratio') or float('nan'):10.3g} "
            f"{r.get('factor_a_vs_eager', float('nan')):7.4f} {r.get('factor_g_vs_eager', float('nan')):7.4f}  "
            f"{r.get('error', '')[:120]}"
        )
    return 0 if obj["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
