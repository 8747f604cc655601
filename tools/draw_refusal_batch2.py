"""Draw the second refusal-labelling batch from the committed GPU study (tests/evaluation/data/README.md).

  python tools/draw_refusal_batch2.py OUT.jsonl   # unlabelled rows (label ""), in draw order

9 rows from each cell arm x evaluation set x prompt label, drawn with a fixed seed over every (seed, placement,
prompt) of the cell. The draw reads only the cell membership, never the text or a judge's verdict.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np

from ecliptica.evaluation.judge_validation import split_of

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "results/studies/study_smollm_hh/runs"
ARMS = ("cita_grit", "cita_noinstr", "dpo_grit", "dpo_sys", "prompt_only", "sft_grit")  # none in the first batch
EVAL_SETS = {"dev": "XSTest subset", "test": "Do-Not-Answer + MT-Bench"}
SEEDS = (0, 1, 2)
PER_CELL = 9
DRAW_SEED = 35


def cell_rows(arm: str, eval_set: str, label: str) -> list[dict]:
    rows = []
    for seed in SEEDS:
        path = STUDY / f"{arm}-s{seed}/eval/{eval_set}/generations.jsonl.gz"
        for line in gzip.open(path, "rt"):
            r = json.loads(line)
            if r["label"] != label:
                continue
            row_id = f"{arm}-s{seed}/{eval_set}/{r['placement']}/{r['id']}"
            source = (
                f"{arm} seed {seed}, study_smollm_hh {eval_set} set ({EVAL_SETS[eval_set]}), placement {r['placement']}"
            )
            rows.append(
                {
                    "id": row_id,
                    "prompt": r["prompt"],
                    "prompt_label": label,
                    "completion": r["completion"],
                    "source": source,
                    "label": "",
                    "split": split_of(row_id),
                }
            )
    return rows


def draw() -> list[dict]:
    rng = np.random.default_rng(DRAW_SEED)
    out = []
    for arm in ARMS:
        for eval_set in EVAL_SETS:
            for label in ("safe", "unsafe"):
                rows = cell_rows(arm, eval_set, label)
                out += [rows[int(i)] for i in sorted(rng.choice(len(rows), PER_CELL, replace=False))]
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    rows = draw()
    Path(ap.parse_args().out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{len(rows)} rows")
