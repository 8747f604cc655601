"""Evaluation numbers as TensorBoard scalars, next to each run's training curves.

The trainer logs training scalars under `STUDY_DIR/tensorboard/<run_id>/`; the study adds the
evaluation summary there as `eval/<name>`, each number under its `EvalSummary` name (`eval/aqi`,
`eval/refusal_rate_unsafe`, `eval/perplexity`, ...), so TensorBoard, the store and the CSV agree on names.
"""

from __future__ import annotations

from pathlib import Path

from ..evaluation.summary import Estimate, EvalSummary, Rate

# what the numbers were computed with, not results: no curve
SETTINGS = ("aqi_gamma", "aqi_pca_dim", "aqi_layer", "n_prompts")


def eval_scalars(summary: EvalSummary) -> dict[str, float]:
    """`eval/<name>` -> value for every number of the summary: an estimate's value, a rate's rate, a plain
    float; per-placement rates as `eval/<name>/<placement>`. Undefined numbers, flags (`collapsed`),
    labels and the AQI settings are left out. A field added to `EvalSummary` appears here by itself."""
    out = {}
    for name in type(summary).model_fields:
        if name in SETTINGS:
            continue
        v = getattr(summary, name)
        for tag, x in ({f"{name}/{k}": x for k, x in v.items()} if isinstance(v, dict) else {name: v}).items():
            if (number := _number(x)) is not None:
                out[f"eval/{tag}"] = number
    return out


def _number(v) -> float | None:
    v = v.value if isinstance(v, Estimate) else v.rate if isinstance(v, Rate) else v
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def write_eval_scalars(log_dir: str | Path, summary: EvalSummary, step: int = 0) -> dict[str, float]:
    """Append the evaluation scalars to the run's TensorBoard directory at `step` (its last training step,
    so they sit at the end of its curves); returns what was written."""
    from torch.utils.tensorboard import SummaryWriter

    scalars = eval_scalars(summary)
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, global_step=step)
    finally:
        writer.close()
    return scalars
