"""Evaluation numbers as TensorBoard scalars, next to each run's training curves.

The trainer logs training scalars under `STUDY_DIR/tensorboard/<run_id>/`; the study adds the
evaluation summary there as `eval/<name>`, each number under its `EvalSummary` name (`eval/aqi`,
`eval/refusal_rate_unsafe`, ...), so TensorBoard, the store and the CSV agree on names.
"""
from __future__ import annotations

from pathlib import Path

from ..evaluation.summary import EvalSummary, Estimate, Rate

# the headline numbers; AQI settings (gamma, pca_dim, layer) and counts are not curves
SCALARS = ("aqi", "probe_auroc", "refusal_rate_unsafe", "over_refusal_rate_safe", "perplexity", "kl_mean_token")


def eval_scalars(summary: EvalSummary) -> dict[str, float]:
    """`eval/<name>` -> value for every headline number the evaluation produced (undefined ones left out)."""
    out = {}
    for name in SCALARS:
        v = getattr(summary, name)
        v = v.value if isinstance(v, Estimate) else v.rate if isinstance(v, Rate) else v
        if v is not None:
            out[f"eval/{name}"] = float(v)
    return out


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
