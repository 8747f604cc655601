"""How does a GRIT step compare with an AdamW step? Update norms and cosines from one shared training state.

  PYTHONPATH=src python benchmarks/grit_step_compare.py --model smollm2-135m-instruct --data .carry/hh_test.jsonl.gz
  PYTHONPATH=src python benchmarks/grit_step_compare.py --shape llama3-8b --tok .carry/tok --data ...  (random init)

DPO through the engine (defaults for the device), LoRA r16 on the 7 projections, 8 pairs per step. AdamW trains
--warm steps so that B is no longer zero; from that state (weights copied back before each variant, the same pairs
in every variant) it measures:
- the preconditioner itself: one step of SGD at lr 1 gives -g, one step of GRIT with inner SGD at lr 1 gives -P g,
  for several dampings (relative, the default mode): ||P g|| / ||g|| and cos(g, P g);
- what a user's optimizer does with it: --steps steps of AdamW and of GRIT (inner AdamW, the default config, and the
  other dampings), each from fresh optimizer state at --lr: the update's norm and its cosine with AdamW's update.
Cosines and norms are over all LoRA parameters together, and separately over the A and the B matrices.
Writes grit_step_compare.json to --results (and $OUT when set).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def build_trainer(a):
    import ecliptica.train.engine as E
    from ecliptica.config import TrainConfig

    cfg = TrainConfig.model_validate(
        {
            "run_dir": f"/tmp/ecl_bench/grit_step_compare_{a.shape or 'model'}",
            "seed": 11,
            "model": {"name": a.model or a.tok, "dtype": "auto", "attn_implementation": "sdpa"},
            "lora": {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": C.TARGETS},
            "data": {
                "path": a.data,
                "format": "hh-rlhf",
                "on_bad_row": "skip",
                "limit": 400,
                "max_length": 512,
                "max_prompt_length": 256,
            },
            "method": {"name": "dpo", "beta": 0.1},
            "optimizer": {"name": "adamw", "lr": a.lr},
            "schedule": {"name": "constant"},
            # eager layers: the comparison is of optimizer arithmetic, and every optimizer variant's factor taps would
            # otherwise recompile the layers
            "train": {
                "max_steps": a.warm + a.steps,
                "micro_batch_size": 4,
                "grad_accum": 2,
                "progress": False,
                "compile_layers": "off",
            },
        }
    )
    saved = E.load_model
    if a.shape:
        E.load_model = lambda mcfg, device_map=None: C.build_model(a.shape, a.vocab)
    try:
        return E.Trainer(cfg, overwrite=True).setup()
    finally:
        E.load_model = saved


def lora_params(trainer) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in trainer.peft_model.named_parameters() if p.requires_grad}


def run_variant(trainer, snapshot, make_optimizer, first_step: int, steps: int) -> dict[str, torch.Tensor]:
    """Restore the snapshot, train `steps` steps with a fresh optimizer, return each parameter's update."""
    from ecliptica.train.optim import NoHooks

    params = lora_params(trainer)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(snapshot[n])
    opt = make_optimizer(list(params.values()))
    trainer.optimizer, trainer.optimizer_hooks = opt, opt if hasattr(opt, "set_token_mask") else NoHooks()
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    for s in range(first_step, first_step + steps):
        trainer.train_step(s)
    if hasattr(opt, "remove_hooks"):
        opt.remove_hooks()
    return {n: (p.detach().float() - snapshot[n].float()) for n, p in params.items()}


def compare(update: dict, ref: dict) -> dict:
    out = {}
    for part, keep in (("all", lambda n: True), ("A", lambda n: "lora_A" in n), ("B", lambda n: "lora_B" in n)):
        x = torch.cat([update[n].flatten() for n in update if keep(n)]).double()
        r = torch.cat([ref[n].flatten() for n in ref if keep(n)]).double()
        out[part] = {
            "norm": float(x.norm()),
            "norm_ratio": float(x.norm() / r.norm()) if r.norm() > 0 else None,
            "cosine": float(x @ r / (x.norm() * r.norm())) if x.norm() > 0 and r.norm() > 0 else None,
        }
    return out


def main(argv=None):
    from ecliptica.grit import GritConfig, GritOptimizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(ap)
    ap.add_argument("--model", default=None, help="a model name or path (e.g. smollm2-135m-instruct)")
    ap.add_argument("--shape", default=None, help="a random-init shape instead of --model (e.g. llama3-8b)")
    ap.add_argument("--warm", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--dampings", default="1e-3,1e-2,1e-1,1")
    ap.set_defaults(steps=1)
    a = C.parse(ap, argv)
    if not (a.model or a.shape):
        ap.error("give --model or --shape")
    trainer = build_trainer(a)
    for s in range(a.warm):
        trainer.train_step(s)
    snapshot = {n: p.detach().clone() for n, p in lora_params(trainer).items()}
    model, start = trainer.peft_model, a.warm
    dampings = [float(d) for d in a.dampings.split(",")]

    def grit(damping, inner, lr):
        return lambda params: GritOptimizer(model, GritConfig(inner=inner, lr=lr, damping=damping, reproject_steps=0))

    raw = run_variant(trainer, snapshot, lambda ps: torch.optim.SGD(ps, lr=1.0), start, 1)
    result = {
        "card": C.card(),
        "versions": C.versions(),
        "model": a.model,
        "shape": a.shape,
        "warm_steps": a.warm,
        "lr": a.lr,
        "steps": a.steps,
        "preconditioner": {},
        "optimizer_step": {},
    }
    for d in dampings:
        result["preconditioner"][str(d)] = compare(run_variant(trainer, snapshot, grit(d, "sgd", 1.0), start, 1), raw)
    adamw = run_variant(trainer, snapshot, lambda ps: torch.optim.AdamW(ps, lr=a.lr, weight_decay=0.0), start, a.steps)
    result["optimizer_step"]["adamw"] = compare(adamw, adamw)
    for d in dampings:
        result["optimizer_step"][f"grit_{d}"] = compare(
            run_variant(trainer, snapshot, grit(d, "adamw", a.lr), start, a.steps), adamw
        )
    for out in C.out_dirs(a.results):
        C.write_json(out / f"grit_step_compare_{a.shape or Path(a.model).name}.json", result)
    print("RESULT", json.dumps(result), flush=True)
    print(f"\n{a.shape or a.model}: preconditioner (inner SGD, lr 1) vs the raw gradient")
    for d, r in result["preconditioner"].items():
        print(
            f"  damping {d:>6}: ||Pg||/||g|| {r['all']['norm_ratio']:.3g}  cos(g, Pg) {r['all']['cosine']:.3f}  "
            f"(A {r['A']['cosine']:.3f}, B {r['B']['cosine']:.3f})"
        )
    print(f"{a.steps} optimizer step(s) at lr {a.lr} vs AdamW's")
    for k, r in result["optimizer_step"].items():
        print(
            f"  {k:>12}: ||update|| {r['all']['norm']:.3g}  ratio {r['all']['norm_ratio']:.3f}  "
            f"cos {r['all']['cosine']:.3f}  (A {r['A']['cosine']}, B {r['B']['cosine']})"
        )


if __name__ == "__main__":
    main()
