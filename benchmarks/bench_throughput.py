"""Ecliptica vs TRL: s/step, tokens/s, peak memory and MFU on random-init Llama shapes, one process, one card.

  PYTHONPATH=src python benchmarks/bench_throughput.py --data .carry/hh_test.jsonl.gz --tok .carry/tok
  (CPU smoke test: --shapes tiny --vocab 49152 --steps 4)

Setup (both sides): LoRA r16/alpha16 on q,k,v,o,gate,up,down; bf16; 2 pairs x grad-accum 4 (8 pairs per optimizer
step); max length 1024; SDPA; the first 400 usable HH-RLHF harmless test pairs rendered with the SmolLM2 chat
template; gradient checkpointing on and off. Comparisons: DPO vs TRL DPOTrainer, CITA (token_kl) vs TRL DPOTrainer
(TRL has no CITA: the anchor), SFT vs TRL SFTTrainer. The plain `dpo`/`cita`/`sft` rows are the engine's DEFAULT
settings (micro_batch_tokens auto, packed_attention auto: varlen on CUDA, compile_layers auto: on on CUDA); each
row records what they chose. Extra rows (--variants): mb8 (one micro-batch of 8 pairs), plain (no speed-up:
micro_batch_size x grad_accum, dense mask, eager), sized (auto sizing, dense mask, eager), dense / flex /
eager / nooffload / nofusedlora / fused (the defaults with one part switched back), liger (eager layers with liger-kernel's
RMSNorm, SwiGLU and RoPE; needs liger-kernel), ligercompiled (the defaults with liger-kernel's kernels), memG (auto
sized to G GiB), tokN / tokNcM (fixed budget N [+ chunk M]), chunkM, 4bit (ours default vs TRL, both on the saved
random-init model in bitsandbytes NF4; needs bitsandbytes), 4bit-eager (ours in 4-bit with eager layers; no TRL row),
4bit-memG (ours in 4-bit auto sized to G GiB; no TRL row), 4bit-tokN (ours in 4-bit with micro_batch_tokens N; no
TRL row), 4bit-nofusedlora, 4bit-nf4bnb (bitsandbytes' NF4 ops instead of train/nf4.py's), 4bit-chunkM (ours in
4-bit with LM-head chunk M; no TRL row); 4-bit options join with "+" (4bit-nf4bnb+mem6.5).
--unsloth-site DIR: Unsloth (FastLanguageModel + TRL DPOTrainer) in its own process and install target
(benchmarks/unsloth_dpo.py), 16-bit and 4-bit, recorded as `unsloth_dpo` / `unsloth_dpo_4bit` rows.
Definitions: see benchmarks/_common.py.
Writes throughput_{method}_{shape}_gc{0,1}.json to --results (default runs/benchmarks/) and copies them to $OUT when set.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(ap)
    ap.add_argument("--shapes", default="llama3-8b,llama3.2-1b")
    ap.add_argument("--gc", default="off,on")
    ap.add_argument("--methods", default="dpo,cita,sft")
    ap.add_argument(
        "--variants",
        default="plain",
        help="extra rows: mb8, plain, sized, dense, flex, eager, nooffload, nofusedlora, fused, liger, "
        "ligercompiled, memG, tokN, tokNcM, chunkM, 4bit, 4bit-eager, 4bit-nofusedlora, 4bit-nf4bnb, "
        "4bit-memG, 4bit-tokN, 4bit-chunkM (4-bit options join with +), none "
        "(see the module docstring)",
    )
    ap.add_argument("--unsloth-site", help="an install target holding unsloth (and its own trl/transformers pins)")
    ap.add_argument("--unsloth", default="16bit,4bit", help="with --unsloth-site: which Unsloth precisions")
    ap.add_argument("--model-cache", default="/tmp/ecl_bench_models", help="saved random-init models (4bit, unsloth)")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--no-defaults", action="store_true", help="only the --variants rows (and Unsloth)")
    ap.add_argument("--from-log", help="rebuild the result files and the table from a log's RESULT lines (no runs)")
    ap.add_argument("--card", help="with --from-log: the card name the log was made on")
    ap.add_argument("--versions", help="with --from-log: JSON of the versions the log was made with")
    a = C.parse(ap, argv)
    t0 = time.perf_counter()
    if a.from_log:
        rows, card, vers = [], a.card, json.loads(a.versions) if a.versions else None
    else:
        rows = C.hh_rows(a.data)
        card, vers = C.card(), C.versions()
    print("card", card, "versions", vers, flush=True)
    shapes, gcs = a.shapes.split(","), [g == "on" for g in a.gc.split(",")]
    methods = a.methods.split(",")
    variants = [v for v in a.variants.split(",") if v and v != "none"]
    res: dict = {}  # (shape, gc) -> {"trl_dpo":..., "trl_sft":..., "dpo":..., "cita":..., "sft":..., "dpo_mb8":...}

    def attempt(key, name, fn):
        if time.perf_counter() - t0 > a.budget_s:
            print(f"SKIP {key} {name}: time budget", flush=True)
            return
        ts = time.perf_counter()
        try:
            r = fn()
        except Exception as e:  # an OOM or a TRL failure must not lose the rest
            traceback.print_exc()
            r = {"error": repr(e)[:300]}
            C.free()
        r["wall_s"] = round(time.perf_counter() - ts, 1)
        res.setdefault(key, {})[name] = r
        print("RESULT", json.dumps({"shape": key[0], "gc": key[1], "run": name, **r}), flush=True)
        dump()

    def dump():
        everything = []
        for (shape, gc_on), d in res.items():
            for m in methods:
                if m not in d and not any(k.startswith(m + "_") for k in d):  # --no-defaults runs have variants only
                    continue
                trl_name = "trl_sft" if m == "sft" else "trl_dpo"
                obj = {
                    "method": m,
                    "shape": shape,
                    "gradient_checkpointing": gc_on,
                    "card": card,
                    "trl_baseline": "SFTTrainer" if m == "sft" else "DPOTrainer",
                    "ours": d.get(m),
                    "trl": d.get(trl_name),
                    "steps": a.steps,
                    "timed_steps": a.steps - 2,
                    "pairs_per_step": 8,
                    "versions": vers,
                    "ours_variants": {k.split("_", 1)[1]: v for k, v in d.items() if k.startswith(m + "_")},
                    "trl_variants": {k[len(trl_name) + 1 :]: v for k, v in d.items() if k.startswith(trl_name + "_")},
                    "unsloth": {k: v for k, v in d.items() if k.startswith("unsloth") and m != "sft"},
                }
                o, t = d.get(m) or {}, d.get(trl_name) or {}
                if "tok_per_s" in o and "tok_per_s" in t:
                    obj["tok_per_s_ratio"] = round(o["tok_per_s"] / t["tok_per_s"], 3)
                    obj["peak_gib_ratio"] = round(o["peak_gib"] / t["peak_gib"], 3) if t["peak_gib"] else None
                C.write_json(Path(a.results) / f"throughput_{m}_{shape}_gc{int(gc_on)}.json", obj)
                everything.append(obj)
        if os.environ.get("OUT"):  # one file back from the device machine (at most 8 files come back)
            C.write_json(Path(os.environ["OUT"]) / "throughput_all.json", {"card": card, "results": everything})

    if a.from_log:
        for line in Path(a.from_log).read_text().splitlines():
            if line.startswith("RESULT "):
                r = json.loads(line[len("RESULT ") :])
                key = (r.pop("shape"), r.pop("gc"))
                res.setdefault(key, {})[r.pop("run")] = r
        dump()
        print_table(res, card)
        return

    for shape in shapes if not a.no_defaults else []:
        for gc_on in gcs:
            key = (shape, gc_on)
            common = dict(shape=shape, gc_on=gc_on, steps=a.steps, vocab=a.vocab)
            if not a.no_trl and ("dpo" in methods or "cita" in methods):
                attempt(key, "trl_dpo", lambda: C.run_trl("dpo", rows=rows, tok_dir=a.tok, **common))
            for m in methods:
                if m == "sft":
                    continue
                attempt(key, m, lambda m=m: C.run_ours(m, data=a.data, tok=a.tok, **common))
            if "sft" in methods:
                if not a.no_trl:
                    attempt(key, "trl_sft", lambda: C.run_trl("sft", rows=rows, tok_dir=a.tok, **common))
                attempt(key, "sft", lambda: C.run_ours("sft", data=a.data, tok=a.tok, **common))

    def saved(shape):
        return C.save_random_model(shape, a.vocab, a.tok, f"{a.model_cache}/{shape}_{a.vocab}")

    for v in variants:
        for shape in shapes:
            for gc_on in gcs:
                key = (shape, gc_on)
                common = dict(shape=shape, gc_on=gc_on, steps=a.steps, vocab=a.vocab, data=a.data, tok=a.tok)
                if v == "4bit" or v.startswith("4bit-"):  # ours on the saved model in NF4; TRL only for plain 4bit
                    if importlib.util.find_spec("bitsandbytes") is None:
                        print("SKIP 4bit: bitsandbytes is not importable", flush=True)
                        continue
                    trl_common = {k: x for k, x in common.items() if k not in ("data", "tok")}
                    if v == "4bit" and not a.no_trl and ("dpo" in methods or "cita" in methods):
                        attempt(
                            key,
                            "trl_dpo_4bit",
                            lambda trl_common=trl_common, shape=shape: C.run_trl(
                                "dpo", rows=rows, tok_dir=a.tok, model_dir=saved(shape), **trl_common
                            ),
                        )
                    kw = four_bit_settings(v)
                    for m in [m for m in methods if m != "sft"]:
                        attempt(
                            key,
                            f"{m}_{v}",
                            lambda m=m, common=common, shape=shape, kw=kw, v=v: C.run_ours(
                                m,
                                model_dir=saved(shape),
                                tag="_" + v.replace("-", "_").replace("+", "_"),
                                **kw,
                                **common,
                            ),
                        )
                    continue
                if v == "mb8" and not a.no_trl and ("dpo" in methods or "cita" in methods):
                    attempt(
                        key,
                        "trl_dpo_mb8",
                        lambda common=common: C.run_trl(
                            "dpo",
                            rows=rows,
                            tok_dir=a.tok,
                            mb=8,
                            ga=1,
                            **{k: v for k, v in common.items() if k not in ("data", "tok")},
                        ),
                    )
                ms = [m for m in methods if m != "sft" or v.startswith("tok")]
                kw = variant_settings(v) if ms else {}
                for m in ms:
                    attempt(key, f"{m}_{v}", lambda m=m, kw=kw: run_variant(m, common, kw))
    if a.unsloth_site:
        for shape in shapes:
            for gc_on in gcs:
                for prec in a.unsloth.split(","):
                    name = "unsloth_dpo" + ("_4bit" if prec == "4bit" else "")
                    attempt(
                        (shape, gc_on),
                        name,
                        lambda shape=shape, gc_on=gc_on, prec=prec: run_unsloth(
                            a, saved(shape), shape, gc_on, prec == "4bit"
                        ),
                    )
    print_table(res, card)
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)


def variant_settings(v: str) -> dict:
    """run_ours keywords (with its run-directory tag) for a 16-bit --variants row (see the module docstring)."""
    if v == "mb8":
        kw = dict(mb=8, ga=1, tag="_mb8")
    elif v.startswith("tok"):  # tok2048: micro_batch_tokens=2048 (8 pairs/step); tok2048c256: + chunk 256
        tok, _, chunk = v[3:].partition("c")
        kw = dict(tokens=int(tok), chunk=int(chunk) if chunk else None, tag="_" + v)
    elif v.startswith("chunk"):
        kw = dict(chunk=int(v[5:]), tag="_" + v)
    elif v == "plain":  # no speed-up: micro_batch_size x grad_accum, dense block mask, eager layers
        kw = dict(
            train_extra={"micro_batch_tokens": None, "packed_attention": "dense", "compile_layers": "off"}, tag="_plain"
        )
    elif v == "dense":  # defaults but a dense block mask: what the packed-attention kernel adds
        kw = dict(train_extra={"packed_attention": "dense"}, tag="_dense")
    elif v == "flex":  # defaults but FlexAttention instead of varlen
        kw = dict(train_extra={"packed_attention": "flex"}, tag="_flex")
    elif v == "eager":  # defaults but eager decoder layers: what the regional compile adds
        kw = dict(train_extra={"compile_layers": "off"}, tag="_eager")
    elif v == "fused":  # defaults but inductor's fused fp32 intermediates (no eager-cast emulation)
        kw = dict(tag="_fused", emulate_casts=False)
    elif v == "nofusedlora":  # defaults but peft's LoRA forward instead of the fused addmm
        kw = dict(train_extra={"fused_lora": "off"}, tag="_nofusedlora")
    elif v == "nf4bnb":  # 4-bit only (4bit-nf4bnb): bitsandbytes' own NF4 ops in place of train/nf4.py's
        kw = dict(train_extra={"nf4_kernel": "bitsandbytes"}, tag="_nf4bnb")
    elif v == "nooffload":  # defaults but no activation offloading (changes something with gc on)
        kw = dict(train_extra={"offload_activations": "off"}, tag="_nooffload")
    elif v == "sized":  # auto sizing alone: dense mask, eager layers
        kw = dict(train_extra={"packed_attention": "dense", "compile_layers": "off"}, tag="_sized")
    elif v.startswith("mem"):  # auto sizing to a peak budget, e.g. TRL's peak
        kw = dict(train_extra={"memory_budget_gib": float(v[3:])}, tag="_" + v)
    elif v == "liger":  # liger-kernel's RMSNorm, SwiGLU and RoPE instead of the compiled layers' own fusion
        kw = dict(train_extra={"compile_layers": "off"}, tag="_liger", liger=True)
    elif v == "ligercompiled":  # liger-kernel's kernels inside the compiled layers
        kw = dict(tag="_ligercompiled", liger=True)
    else:
        raise ValueError(v)
    return kw


def four_bit_settings(v: str) -> dict:
    """run_ours keywords for a 4-bit row: 4bit (defaults), or 4bit-eager / 4bit-nofusedlora / 4bit-nf4bnb /
    4bit-memG / 4bit-tokN / 4bit-chunkM, which set what the 16-bit rows of those names set (variant_settings);
    options join with "+" (4bit-nf4bnb+mem6.5)."""
    opts = v[len("4bit-") :].split("+") if v != "4bit" else []
    kw: dict = {}
    for opt in opts:
        one = _four_bit_option(v, opt)
        kw["train_extra"] = {**kw.get("train_extra", {}), **one.pop("train_extra", {})}
        kw.update(one)
    return kw


def _four_bit_option(v: str, opt: str) -> dict:
    if opt not in ("eager", "nofusedlora", "nf4bnb") and not opt.startswith(("mem", "chunk", "tok")):
        raise ValueError(f"unknown 4-bit variant {v!r}")
    kw = variant_settings(opt)
    del kw["tag"]  # the 4-bit row's own tag is set by the caller
    return kw


def run_variant(method: str, common: dict, kw: dict) -> dict:
    """C.run_ours with a variant's settings; `emulate_casts` (the `fused` variant) sets train/compile.py's
    EMULATE_PRECISION_CASTS for this run only; `liger` builds the model with liger-kernel's Llama RMSNorm, SwiGLU
    MLP and RoPE (this run only)."""
    import torch._inductor.config as inductor

    import ecliptica.train.compile as compile_mod

    kw = dict(kw)
    emulate = kw.pop("emulate_casts", compile_mod.EMULATE_PRECISION_CASTS)
    liger = kw.pop("liger", False)
    saved = compile_mod.EMULATE_PRECISION_CASTS, inductor.emulate_precision_casts
    compile_mod.EMULATE_PRECISION_CASTS = emulate
    try:
        with liger_llama(liger):
            return C.run_ours(method, **common, **kw)
    finally:
        compile_mod.EMULATE_PRECISION_CASTS, inductor.emulate_precision_casts = saved


@contextlib.contextmanager
def liger_llama(on: bool):
    """liger-kernel's class-level patch of transformers' Llama (RMSNorm, SwiGLU MLP, RoPE; not its loss kernels,
    since the engine computes its own log-probabilities), undone on exit so later rows build the plain model."""
    if not on:
        yield
        return
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from transformers.models.llama import modeling_llama as ml

    names = ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")
    before = {n: getattr(ml, n) for n in names}
    apply_liger_kernel_to_llama(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    try:
        yield
    finally:
        for n, f in before.items():
            setattr(ml, n, f)


def run_unsloth(a, model_dir: str, shape: str, gc_on: bool, four_bit: bool) -> dict:
    """benchmarks/unsloth_dpo.py in a child process whose PYTHONPATH puts Unsloth's install target first."""
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([a.unsloth_site, str(here)]), "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        str(here / "unsloth_dpo.py"),
        "--model-dir",
        model_dir,
        "--shape",
        shape,
        "--vocab",
        str(a.vocab),
        "--data",
        a.data,
        "--steps",
        str(a.steps),
        "--gc",
        "on" if gc_on else "off",
    ]
    if four_bit:
        cmd.append("--4bit")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    sys.stdout.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("UNSLOTH "):
            return json.loads(line[len("UNSLOTH ") :])
    return {"error": f"unsloth child exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}


def print_table(res, card):
    def f(r, k, fmt):
        return format(r[k], fmt) if r and r.get(k) is not None else "-"

    print(f"\n{card}")
    hdr = (
        f"{'shape':12} {'gc':3} {'run':12} {'s/step':>7} {'tok/s':>8} {'med tok/s':>9} {'peakGiB':>8} {'MFU':>6} "
        f"{'vsTRL tok/s':>11} {'vsTRL mem':>9}"
    )
    print(hdr)
    print("-" * len(hdr))
    for (shape, gc_on), d in res.items():
        for name, r in d.items():
            trl_name = "trl_sft" if name.startswith("sft") else "trl_dpo"
            suffix = name.split("_", 1)[1] if "_" in name and not name.startswith("trl") else ""
            suffix = "4bit" if suffix.startswith("4bit") else suffix  # every 4-bit row against TRL in 4-bit
            if name.startswith("unsloth"):  # against TRL at the same precision
                suffix = "4bit" if name.endswith("_4bit") else ""
            base = d.get(f"{trl_name}_{suffix}") if suffix and f"{trl_name}_{suffix}" in d else d.get(trl_name)
            ratio = mem = "-"
            if not name.startswith("trl") and base and "tok_per_s" in base and "tok_per_s" in r:
                ratio = f"{r['tok_per_s'] / base['tok_per_s']:.2f}x"
                mem = f"{r['peak_gib'] / base['peak_gib']:.2f}x" if base["peak_gib"] else "-"
            err = "  " + r["error"][:60] if "error" in r else ""
            print(
                f"{shape:12} {'on' if gc_on else 'off':3} {name:12} {f(r, 's_per_step', '.3f'):>7} "
                f"{f(r, 'tok_per_s', '.0f'):>8} {f(r, 'tok_per_s_median', '.0f'):>9} {f(r, 'peak_gib', '.2f'):>8} {f(r, 'mfu', '.3f'):>6} {ratio:>11} {mem:>9}{err}"
            )


if __name__ == "__main__":
    main()
