"""GRIT overhead: the same ecliptica DPO step with AdamW and with GRIT (K-FAC preconditioned LoRA updates).

  PYTHONPATH=src python benchmarks/bench_grit_overhead.py --data .carry/hh_test.jsonl.gz --tok .carry/tok
  (CPU smoke test: --shape tiny --vocab 49152 --steps 4)

Llama-3-8B shape (random init), LoRA r16/alpha16 on the 7 projections, bf16, 2 pairs x grad-accum 4, DPO,
optimizer.name=adamw vs grit with GritConfig defaults (src/ecliptica/grit/config.py). GRIT's own metrics after the
last step (valid share, damping, preconditioned/raw gradient ratio) and its summary block are recorded with its
timings, so a run where GRIT did nothing cannot pass for a cheap one. Timing/memory as in
benchmarks/_common.py (first 2 steps skipped). Targets: step-time ratio <= 1.10, peak-memory ratio <= 1.02.
Writes grit_overhead.json to --results (default runs/benchmarks/) and to $OUT when set.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(ap)
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--method", default="dpo")
    ap.add_argument("--gc", default="off,on", help="first value is the headline; the others go under 'variants'")
    a = C.parse(ap, argv)
    t0 = time.perf_counter()
    card = C.card()
    print("card", card, "versions", C.versions(), flush=True)
    runs = {}
    for g in a.gc.split(","):
        gc_on = g == "on"
        for opt in ("adamw", "grit"):
            if time.perf_counter() - t0 > a.budget_s:
                print("SKIP", g, opt, "time budget", flush=True)
                continue
            grit_seen: dict = {}
            try:
                r = C.run_ours(
                    a.method,
                    a.shape,
                    gc_on,
                    a.steps,
                    a.data,
                    a.tok,
                    a.vocab,
                    optimizer=opt,
                    hooks=C.record_grit(grit_seen) if opt == "grit" else None,
                )
                r.update({k: grit_seen.get(k) for k in ("grit_metrics", "grit_summary")})
            except Exception as e:
                traceback.print_exc()
                r = {"error": repr(e)[:300]}
                C.free()
            runs[(g, opt)] = r
            print("RESULT", json.dumps({"gc": g, "optimizer": opt, **r}), flush=True)

    def block(g):
        ad, gr = runs.get((g, "adamw"), {}), runs.get((g, "grit"), {})
        out = {
            "gradient_checkpointing": g == "on",
            "adamw": {k: ad.get(k) for k in ("s_per_step", "peak_gib", "tok_per_s")},
            "grit": {k: gr.get(k) for k in ("s_per_step", "peak_gib", "tok_per_s", "grit_metrics", "grit_summary")},
        }
        if ad.get("s_per_step") and gr.get("s_per_step"):
            out["step_time_ratio"] = round(gr["s_per_step"] / ad["s_per_step"], 3)
            out["peak_memory_ratio"] = round(gr["peak_gib"] / ad["peak_gib"], 3) if ad["peak_gib"] else None
        for k in ("error",):
            if k in ad or k in gr:
                out["errors"] = {"adamw": ad.get("error"), "grit": gr.get("error")}
        return out

    gcs = a.gc.split(",")
    head = block(gcs[0])
    from ecliptica.grit import GritConfig

    obj = {
        "card": card,
        "shape": a.shape,
        "method": a.method,
        **head,
        "grit_config": GritConfig().model_dump(),
        "steps": a.steps,
        "timed_steps": a.steps - 2,
        "setup": "LoRA r16/a16 on q,k,v,o,gate,up,down; bf16; 2 pairs x grad-accum 4; HH-RLHF harmless; SDPA",
        "targets": {"step_time_ratio": 1.10, "peak_memory_ratio": 1.02},
        "versions": C.versions(),
        "variants": {f"gc_{g}": block(g) for g in gcs[1:]},
    }
    for out in C.out_dirs(a.results):
        C.write_json(out / "grit_overhead.json", obj)
    print(f"\n{card}  {a.shape} {a.method}")
    for g in gcs:
        b = block(g)
        print(
            f"gc={g:3} adamw {b['adamw']['s_per_step']} s/step {b['adamw']['peak_gib']} GiB | grit "
            f"{b['grit']['s_per_step']} s/step {b['grit']['peak_gib']} GiB | ratios time "
            f"{b.get('step_time_ratio')} mem {b.get('peak_memory_ratio')}"
        )
        gm = b["grit"].get("grit_metrics") or {}
        print(
            f"       GRIT acted: valid_share {gm.get('grit/valid_share')} damping {gm.get('grit/damping')} "
            f"precond_grad_ratio {gm.get('grit/precond_grad_ratio')} summary {b['grit'].get('grit_summary')}"
        )
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
