"""Score the rule and learned refusal judges on every test set (docs/evaluation.md, "Validation").

  python tools/score_refusal_judges.py   # prints a markdown table

Test sets: the test halves of the two hand-labelled batches and PyRIT's human-labelled refusals (installed
package). Run once, after the rules and the learned judge's features and grid were frozen on dev.
"""

from __future__ import annotations

from pathlib import Path

from ecliptica.evaluation.external_labels import load_pyrit_refusal
from ecliptica.evaluation.judge_validation import load_labelled, validate_judge
from ecliptica.evaluation.learned_judge import LearnedJudge
from ecliptica.evaluation.refusal import StringMatchJudge

DATA = Path(__file__).resolve().parent.parent / "tests" / "evaluation" / "data"


def main() -> None:
    sets = {
        "batch 1 test": load_labelled(DATA / "refusal_labelled.jsonl", "test"),
        "batch 2 test": load_labelled(DATA / "refusal_batch2.jsonl", "test"),
        "PyRIT (refusal.csv + refusal_extra.csv)": load_pyrit_refusal(),
    }
    judges = {"strmatch": StringMatchJudge(), "learned": LearnedJudge()}
    print("| test set | judge | n | refusals | precision | recall | F1 any refusal (95% CI) |")
    print("|---|---|---|---|---|---|---|")
    for set_name, rows in sets.items():
        for judge_name, judge in judges.items():
            s = validate_judge(rows, judge)["any_refusal"]
            lo, hi = s["f1_ci"]
            print(
                f"| {set_name} | {judge_name} | {s['n']} | {s['n_positive']} | {s['precision']:.3f} | "
                f"{s['recall']:.3f} | {s['f1']:.3f} ({lo:.3f}-{hi:.3f}) |"
            )


if __name__ == "__main__":
    main()
