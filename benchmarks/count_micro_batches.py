"""How many micro-batches the engine's token-budget split makes over a benchmark's steps, per budget (CPU).

The 4-bit step is host-bound: its time goes with the number of micro-batches, not their tokens
(docs/archive/benchmarks_history.md, "Why the 4-bit budget misses 1.5x at Unsloth's peak"). This counts them for
the benchmarks' data, seed and 8 pairs per step, with the engine's own splitter
(`Trainer.step_micro_batches`), next to the least any split could make (ceil(step tokens / budget)).

    PYTHONPATH=src python benchmarks/count_micro_batches.py --data .carry/hh_test.jsonl.gz --tok .carry/tok \
        --budgets 1347,1536,1728,1920,2112
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


class _Counted(Exception):
    pass


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=".carry/hh_test.jsonl.gz")
    ap.add_argument("--tok", default=".carry/tok")
    ap.add_argument("--method", default="dpo")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--first", type=int, default=2, help="the first step counted (the benchmarks time from step 2)")
    ap.add_argument("--budgets", default="1347,1536,1728,1920,2112")
    a = ap.parse_args(argv)
    budgets = [int(b) for b in a.budgets.split(",")]
    counts: dict = {}

    def count(tr):  # a run_ours hook: the set-up Trainer, before any step
        from ecliptica.train.sizing import Choice

        for b in budgets:
            tr.micro_batches = Choice(b, "counted")
            steps = range(a.first, a.steps)
            made = sum(len(tr.step_micro_batches(s)) for s in steps)
            least = sum(
                math.ceil(sum(tr.layout.tokens(tr.examples[i]) for g in tr.step_micro_batches(s) for i in g) / b)
                for s in steps
            )
            counts[b] = (made, least)
            print(f"budget {b}: {made} micro-batches in steps {a.first}..{a.steps - 1} (at least {least})", flush=True)
        raise _Counted

    try:  # the tiny shape: the same data, seed and pair order as the GPU runs, no training
        C.run_ours(a.method, "tiny", True, a.steps, a.data, a.tok, 49152, hooks=count)
    except _Counted:
        pass
    return counts


if __name__ == "__main__":
    main()
