"""The training summary: what one run's `summary.json` holds, as one typed model.

`Trainer` builds a `TrainSummary` when a run finishes and writes `model_dump(mode="json")` to summary.json;
readers (the study's records and calibration, the CLI, the notebooks) read it back with `read_train_summary`,
so a missing or mistyped field fails with the file and the field named, not as a KeyError hours later.

To add a number: add a field here with a default that says what an older summary.json (written before the
field existed) means, so that finished runs still read.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from ..strict import Strict


class SplitReport(Strict):
    """What identifies the train/val split (data.tokenize.describe_split)."""

    seed: int
    val_fraction: float
    n_train: int
    n_val: int
    train_ids_hash: str
    val_ids_hash: str


class TokenizationReport(Strict):
    """data.tokenize.TokenizeStats of the training split."""

    pairs: int
    prompts_truncated: int
    instructions_truncated: int
    responses_truncated: int
    boundary_merges_avoided: int
    prompt_tokens: int
    response_tokens: int


class DataReport(Strict):
    """What happened to the training data: rows_read = kept + bad_rows + sum(filtered)."""

    rows_read: int
    kept: int
    bad_rows: int
    filtered: dict[str, int]
    train_pairs: int
    val_pairs: int
    split: SplitReport
    tokenization: TokenizationReport


class LoraParameters(Strict):
    """GRIT: physical LoRA parameters vs effective ones (effective rank x (in + out))."""

    physical: int
    effective: int
    effective_ratio: float


class GritReport(Strict):
    """What GRIT did (grit.optimizer.GritOptimizer.summary): whether it preconditioned at all, and how much."""

    active: bool
    valid_share: float
    min_valid_share: float
    preconditioned_steps: int
    mean_precond_grad_ratio: float | None
    geomean_precond_grad_ratio: float | None
    factor_updates: int
    inversions: int
    reprojections: int


class ValidationReport(Strict):
    """The validation curve (train/validation.py): on or off (`every` 0), how often, on how many pairs, at what cost."""

    every: int
    n_pairs: int
    reward_beta: float
    points: int  # validations run since this process started (a resumed run counts from its restart)
    seconds: float
    last: dict[str, int | float | None] | None  # the last point: its step and val/* metrics


class ReferenceCacheReport(Strict):
    """Whether this run read the reference log-probs from disk (train/reference.py)."""

    status: str  # hit, built or not_used
    reason: str | None
    key: str | None
    path: str | None


class TrainSummary(Strict):
    method: str
    optimizer: str
    placement: str
    steps: int
    epochs: float  # passes over the training split that `steps` make
    train_seconds: float
    train_tokens: int
    tokens_per_s: float
    peak_gpu_memory_gib: float | None  # None: trained without CUDA
    final_metrics: dict[str, float]  # the last step's logged metrics (metrics.jsonl's last line, without `step`)
    nonfinite_skipped: int
    config_hash: str
    data_hash: str
    data: DataReport
    parameters: str  # trainable / total, as printed
    num_processes: int
    micro_batch_tokens: int | None  # None: the plain micro_batch_size x grad_accum split
    micro_batch_rule: str
    packed_attention: str
    # the speed features that took effect; a summary.json from before a feature existed trained without it
    compiled_layers: int = 0
    fused_lora_layers: int = 0
    nf4_kernel: str | None = None  # None: not a 4-bit model
    offload_activations: bool = False
    # parallel study workers on one device: its speed here is not a standalone speed
    device_shared_by: int = 1
    # how the run was spread over processes: none, ddp or fsdp2 (a summary.json from before sharding: not recorded)
    sharding: str | None = None
    shard_units: int | None = None  # FSDP2: modules gathered as one (decoder layers + the rest)
    reference_cache: ReferenceCacheReport | None = None  # the on-disk reference log-probs: hit, built or not used
    quant_storage: str | None = None  # 4-bit models: the dtype the quantised weights are stored in
    versions: dict[str, str]
    git_commit: str | None
    # GRIT runs only (OptimizerHooks.summary)
    lora_parameters: LoraParameters | None = None
    grit: GritReport | None = None
    validation: ValidationReport | None = None  # None: a summary.json from before the validation curve

    def as_json(self) -> dict:
        """What summary.json holds: every field, except the blocks a run did not report (the GRIT blocks of a run
        without GRIT, the validation block of an older summary): left out, not null."""
        return self.model_dump(mode="json", exclude={k for k in BLOCKS if getattr(self, k) is None})


BLOCKS = (
    "lora_parameters",
    "grit",
    "validation",
    "sharding",
    "shard_units",
    "reference_cache",
    "quant_storage",
)  # present only when reported


def write_train_summary(summary: TrainSummary) -> str:
    """summary.json's text."""
    return json.dumps(summary.as_json(), indent=1)


def read_train_summary(path: str | Path) -> TrainSummary:
    """A run's summary.json; an unreadable or invalid file names itself and the fields at fault."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable training summary ({type(e).__name__}: {e})") from None
    try:
        return TrainSummary.model_validate(raw)
    except ValidationError as e:
        fields = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ValueError(f"{path}: invalid training summary: {fields}") from None
