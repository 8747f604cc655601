"""Where the default step's time and peak memory go (a diagnostic for bench_throughput / bench_grit_overhead).

  python3 benchmarks/diagnose_step.py --data .carry/hh_test.jsonl.gz --tok .carry/tok --shape llama3-8b --gc off
  (CPU smoke test: --shape tiny --vocab 49152 --steps 8 --what phases)

The engine with its defaults (as `bench_throughput.py` runs it), 8 pairs per step:
- memory: the CUDA allocator's history over one step, replayed to the step's peak; the allocations live there
  are grouped by the innermost Python frame that made them, so the peak splits into weights/state held before
  the step (`before the step`) and what the step itself allocated.
  With torch 2.11, recording the allocator's history while compiled layers run under checkpointing fails in
  autograd ("SystemError: ... apply of FunctionMeta returned NULL", pytorch/pytorch#179536): use --eager there.
- phases: seconds per step (and, on CUDA, the peak allocation) in forward+loss, backward, clipping, optimizer step
  and the rest, each closed by a synchronize (so the phases do not overlap; their sum is a little above the free-running step), for AdamW and
  GRIT in turn; then torch.profiler's top operators over one step, and dynamo's graph-break counters.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

OURS = (
    "ecliptica",
    "transformers",
    "peft",
    "accelerate",
    "bitsandbytes",
    "torchinductor",
    "_inductor",
    "torch/nn",
    "torch/utils",
)


def _frame_key(frames: list[dict]) -> str:
    """The innermost frame in code we can act on (our package, the HF stack or Inductor's generated code)."""
    for f in frames:
        name = f.get("filename", "")
        if any(k in name for k in OURS) and "memory.py" not in name:
            short = "/".join(name.split("/")[-2:])
            return f"{short}:{f.get('line')} {f.get('name')}"
    return "other"


def peak_breakdown(snapshot: dict, device: int, base: int, top: int = 14) -> list[str]:
    """Replay alloc/free events to the highest total, then group the allocations live there."""
    trace = snapshot["device_traces"][device]
    cur, best, best_i = 0, 0, -1
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            cur += e["size"]
        elif e["action"] == "free_completed":
            cur -= e["size"]
        if cur > best:
            best, best_i = cur, i
    live: dict[int, dict] = {}
    for e in trace[: best_i + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    groups = collections.Counter()
    for e in live.values():
        groups[_frame_key(e.get("frames", []))] += e["size"]
    lines = [
        f"before the step: {base / 2**30:.2f} GiB; the step adds up to {best / 2**30:.2f} GiB at event "
        f"{best_i}/{len(trace)} ({len(live)} live blocks allocated in the step; frees of blocks allocated "
        f"before recording make that a lower bound)"
    ]
    for key, size in groups.most_common(top):
        lines.append(f"  {size / 2**30:7.3f} GiB  {key}")
    return lines


def memory_hook(result: dict, at_step: int):
    def hook(tr):
        inner = tr.train_step

        def step(s):
            if s != at_step or not C.CUDA:
                return inner(s)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
            out = inner(s)
            torch.cuda.synchronize()
            snap = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            result["lines"] = [f"max_memory_allocated in the step: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"]
            result["lines"] += peak_breakdown(snap, torch.cuda.current_device(), base)
            return out

        tr.train_step = step

    return hook


def _sync():
    if C.CUDA:
        torch.cuda.synchronize()


def phases_hook(result: dict, first: int, n: int, profile_step: int):
    """Per-phase seconds over steps [first, first + n), then a profiler table for `profile_step`."""

    def hook(tr):
        t = collections.defaultdict(float)
        peaks: dict = {}
        result["peaks"] = peaks
        inner_step, inner_micro = tr.train_step, tr.micro_step
        acc = tr.accelerator
        inner_bwd, inner_clip, inner_opt = acc.backward, acc.clip_grad_norm_, tr.optimizer.step
        on = {"v": False}

        def timed(name, fn):
            def w(*a, **k):
                if not on["v"]:
                    return fn(*a, **k)
                _sync()
                if C.CUDA:  # the phase's own peak, above what is allocated when it starts
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                out = fn(*a, **k)
                _sync()
                t[name] += time.perf_counter() - t0
                if C.CUDA:
                    peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
                    peaks[name + " start"] = max(peaks.get(name + " start", 0.0), base / 2**30)
                return out

            return w

        tr.micro_step = timed("forward+loss", inner_micro)
        acc.backward = timed("backward", inner_bwd)
        acc.clip_grad_norm_ = timed("clip", inner_clip)
        tr.optimizer.step = timed("optimizer", inner_opt)

        def step(s):
            if s == profile_step:
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if C.CUDA else [])
                with profile(activities=acts) as prof:
                    out = inner_step(s)
                    _sync()
                ka = prof.key_averages()
                result["cpu_table"] = ka.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=70)
                if C.CUDA:
                    result["cuda_table"] = ka.table(
                        sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=70
                    )
                return out
            on["v"] = first <= s < first + n
            _sync()
            t0 = time.perf_counter()
            out = inner_step(s)
            _sync()
            if on["v"]:
                t["step"] += time.perf_counter() - t0
            on["v"] = False
            return out

        tr.train_step = step
        result["phases"] = t

    return hook


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(ap)
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--method", default="dpo")
    ap.add_argument("--gc", default="off")
    ap.add_argument("--what", default="memory,phases")
    ap.add_argument("--optimizers", default="adamw,grit")
    ap.add_argument(
        "--4bit",
        dest="four_bit",
        action="store_true",
        help="the saved random-init model loaded in NF4 (needs bitsandbytes)",
    )
    ap.add_argument("--memory-budget-gib", type=float, help="train.memory_budget_gib")
    ap.add_argument(
        "--eager",
        action="store_true",
        help="compile_layers off (the memory mode needs it with checkpointing: see the docstring)",
    )
    ap.add_argument("--model-cache", default="/tmp/ecl_bench_models", help="saved random-init models (--4bit)")
    a = C.parse(ap, argv)
    gc_on = a.gc == "on"
    print("card", C.card(), "versions", C.versions(), flush=True)
    steps = max(a.steps, 8)
    extra = {"memory_budget_gib": a.memory_budget_gib} if a.memory_budget_gib else {}
    if a.eager:
        extra["compile_layers"] = "off"
    kw: dict = {"train_extra": extra}
    if a.four_bit:
        saved = f"{a.model_cache}/{a.shape}_{a.vocab}"
        kw["model_dir"] = C.save_random_model(a.shape, a.vocab, a.tok, saved)
    what = f"{a.method} gc {a.gc}{' 4-bit' if a.four_bit else ''}{' eager' if a.eager else ''}" + (
        f" budget {a.memory_budget_gib} GiB" if a.memory_budget_gib else ""
    )
    if "memory" in a.what:
        res: dict = {}
        r = C.run_ours(a.method, a.shape, gc_on, steps, a.data, a.tok, a.vocab, hooks=memory_hook(res, 4), **kw)
        print(
            f"\n=== memory {what}: run peak {r['peak_gib']} GiB, micro_batch_tokens {r['micro_batch_tokens']} "
            f"({r['micro_batch_rule']})",
            flush=True,
        )
        print("\n".join(res.get("lines", ["(no CUDA)"])), flush=True)
    if "phases" in a.what:
        import torch._dynamo.utils as du

        for opt in a.optimizers.split(","):
            du.counters.clear()
            res = {}
            n = steps - 4
            r = C.run_ours(
                a.method,
                a.shape,
                gc_on,
                steps,
                a.data,
                a.tok,
                a.vocab,
                optimizer=opt,
                hooks=phases_hook(res, 2, n - 1, steps - 1),
                **kw,
            )
            ph = {k: round(v / (n - 1), 4) for k, v in res["phases"].items()}
            ph["rest"] = round(ph["step"] - sum(v for k, v in ph.items() if k != "step"), 4)
            print(
                f"\n=== phases {what} {opt}: micro_batch_tokens {r['micro_batch_tokens']}; s/step (synchronised) "
                f"{ph}; free-running {r['s_per_step']} s/step, peak {r['peak_gib']} GiB",
                flush=True,
            )
            print(
                "peak GiB per phase (and allocated at its start):",
                {k: round(v, 2) for k, v in res.get("peaks", {}).items()},
                flush=True,
            )
            print(
                "graph breaks:",
                dict(du.counters.get("graph_break", {})),
                "recompiles:",
                dict(du.counters.get("recompiles", {})) or None,
                flush=True,
            )
            print(res.get("cpu_table", ""), flush=True)
            print(res.get("cuda_table", ""), flush=True)


if __name__ == "__main__":
    main()
