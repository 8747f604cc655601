"""Study records: one per (arm, seed), read from the run directories; grouping and embeddings.

A record's ``eval`` is the evaluator's own summary (``EvalSummary``, read from the run's eval.json),
so every number the report shows is the number the evaluation computed, under the same name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict

import numpy as np
from pydantic import ValidationError

from ecliptica.evaluation.summary import EvalSummary, read_eval_summary
from ecliptica.runio import read_jsonl_tolerant
from ecliptica.train.summary import read_train_summary

__all__ = [
    "StudyRecord",
    "TrainInfo",
    "PromptMismatchError",
    "Embeddings",
    "group_by_arm",
    "load_embeddings",
    "read_run",
    "Run",
    "BASELINE",
]

BASELINE = "baseline"  # the untrained reference arm every ΔAQI is taken against
Run = tuple[str, int]  # (arm, seed)


class TrainInfo(TypedDict):
    train_seconds: float  # wall time of the optimisation loop (one process)
    tokens_per_s: float
    peak_gpu_memory_gib: float | None  # None: trained on CPU
    train_tokens: int
    num_processes: int  # GPUs (or CPU processes) that ran for train_seconds each
    device_shared_by: NotRequired[int | None]  # runs sharing each device at once (parallel workers); None/absent = 1


class StudyRecord(TypedDict):
    """One (arm, seed) run of the study.

    ``embeddings_path`` (optional) is an ``.npz`` with ``X`` (n x d float32, the layer the
    evaluator scored), ``labels`` (n, 'safe'/'unsafe'), ``axioms`` (n) and ``prompt_ids`` (n); every
    run must hold the same prompts in the same order (checked; ``PromptMismatchError`` otherwise),
    which is what makes the paired tests valid.
    """

    arm: str
    seed: int
    method: str  # "baseline" or a training method
    optimizer: Literal["adamw", "adamw8bit", "grit"] | None
    placement: Literal["none", "system", "prepend"]
    overrides: dict[str, Any]  # per-arm config overrides, e.g. {"optimizer.lr": 1e-4}
    train: TrainInfo | None  # None for the untrained baseline
    metrics_path: str | None  # metrics.jsonl: one JSON object per logged step
    eval: EvalSummary | dict[str, Any]  # validated into EvalSummary by group_by_arm
    embeddings_path: str | None


class PromptMismatchError(ValueError):
    """Two runs' embeddings are not the same prompts in the same order (paired tests need that)."""


TRAIN_FIELDS = (
    "train_seconds",
    "tokens_per_s",
    "peak_gpu_memory_gib",
    "train_tokens",
    "num_processes",
    "device_shared_by",
)


def read_run(
    run_dir: str | Path,
    *,
    arm: str,
    seed: int,
    method: str,
    optimizer: str | None,
    placement: str,
    overrides: Mapping[str, Any],
) -> StudyRecord | None:
    """The record of one run from its directory, or None if it has not been evaluated yet.

    Reads ``eval/test/eval.json`` (named evaluation sets) or ``eval/eval.json`` (or ``eval.json`` where a
    committed result keeps it flat), the
    training ``summary.json`` and ``metrics.jsonl``, and ``eval/embeddings.npz`` when present.
    """
    run_dir = Path(run_dir)
    # eval/test/: a study with named evaluation sets reports its `test` set only (docs/study.md)
    candidates = (run_dir / "eval" / "test" / "eval.json", run_dir / "eval" / "eval.json", run_dir / "eval.json")
    eval_json = next((p for p in candidates if p.exists()), None)
    if eval_json is None:
        return None
    summary_path, metrics = run_dir / "summary.json", run_dir / "metrics.jsonl"
    train = None
    if method != BASELINE and summary_path.exists():
        summary = read_train_summary(summary_path)
        train = {k: getattr(summary, k) for k in TRAIN_FIELDS}
    embeddings = eval_json.parent / "embeddings.npz"
    return {
        "arm": arm,
        "seed": seed,
        "method": method,
        "optimizer": optimizer,
        "placement": placement,
        "overrides": dict(overrides),
        "train": train,
        "metrics_path": str(metrics) if train is not None and metrics.exists() else None,
        "eval": read_eval_summary(eval_json),
        "embeddings_path": str(embeddings) if embeddings.exists() else None,
    }


def group_by_arm(records: Sequence[Mapping[str, Any]], order: Sequence[str] = ()) -> dict[str, dict[int, dict]]:
    """``{arm: {seed: record}}``, arms in ``order`` first (extras after, in order of appearance);
    each record's ``eval`` validated as an ``EvalSummary``."""
    grouped: dict[str, dict[int, dict]] = {}
    for record in records:
        for key in ("arm", "seed", "method", "eval"):
            if key not in record:
                raise ValueError(f"record is missing {key!r}: {dict(record)!r}")
        runs = grouped.setdefault(record["arm"], {})
        if record["seed"] in runs:
            raise ValueError(f"two records for arm {record['arm']!r} seed {record['seed']}")
        try:
            summary = EvalSummary.model_validate(record["eval"])
        except ValidationError as e:
            raise ValueError(f"arm {record['arm']!r} seed {record['seed']}: invalid eval summary:\n{e}") from None
        runs[int(record["seed"])] = {**record, "eval": summary}
    known = [a for a in order if a in grouped]
    extras = [a for a in grouped if a not in known]
    return {arm: dict(sorted(grouped[arm].items())) for arm in known + extras}


@dataclass
class Embeddings:
    labels: np.ndarray
    prompt_ids: np.ndarray
    X: dict[Run, np.ndarray]


def load_embeddings(by_arm: Mapping[str, Mapping[int, dict]]) -> Embeddings | None:
    """Load every run's embeddings and check they are the same prompts, in the same order."""
    reference: tuple[Run, dict[str, np.ndarray]] | None = None
    X: dict[Run, np.ndarray] = {}
    for arm, runs in by_arm.items():
        for seed, record in runs.items():
            if not record.get("embeddings_path"):
                continue
            data = _read_npz(record["embeddings_path"])
            if reference is None:
                reference = ((arm, seed), data)
            else:
                _check_same_prompts(reference, ((arm, seed), data), record["embeddings_path"])
            X[(arm, seed)] = data["X"]
    if reference is None:
        return None
    ref = reference[1]
    return Embeddings(labels=ref["labels"], prompt_ids=ref["prompt_ids"], X=X)


def _read_npz(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        data = {k: np.asarray(npz[k]) for k in ("X", "labels", "prompt_ids")}
    data["labels"] = data["labels"].astype(str)
    data["prompt_ids"] = data["prompt_ids"].astype(str)
    if data["X"].ndim != 2 or data["X"].shape[0] != data["prompt_ids"].shape[0]:
        raise ValueError(f"{path}: X has shape {data['X'].shape} for {data['prompt_ids'].shape[0]} prompt_ids")
    return data


def _check_same_prompts(reference, candidate, path) -> None:
    (ref_run, ref), (run, data) = reference, candidate
    where = f"arm {run[0]!r} seed {run[1]} ({path})"
    against = f"arm {ref_run[0]!r} seed {ref_run[1]}"
    if data["prompt_ids"].shape != ref["prompt_ids"].shape:
        raise PromptMismatchError(
            f"embeddings of {where} have {data['prompt_ids'].size} prompts but {against} has "
            f"{ref['prompt_ids'].size}; every arm must embed the same prompts in the same order"
        )
    differ = np.flatnonzero(data["prompt_ids"] != ref["prompt_ids"])
    if differ.size:
        i = int(differ[0])
        raise PromptMismatchError(
            f"embeddings of {where} do not match {against}: prompt_ids differ at {differ.size} rows, "
            f"first at row {i} ({data['prompt_ids'][i]!r} vs {ref['prompt_ids'][i]!r}); every arm must "
            f"embed the same prompts in the same order"
        )
    if not np.array_equal(data["labels"], ref["labels"]):
        raise PromptMismatchError(f"embeddings of {where} label the same prompts differently from {against}")


def read_training_curves(by_arm: Mapping[str, Mapping[int, dict]]) -> list[dict[str, Any]]:
    """``[{arm, seed, steps: [...]}]`` from each run's metrics.jsonl (runs without one skipped)."""
    curves = []
    for arm, runs in by_arm.items():
        for seed, record in runs.items():
            path = record.get("metrics_path")
            if not path or not Path(path).exists():
                continue
            steps = read_jsonl_tolerant(path)  # a torn last line (a killed writer) is dropped
            curves.append({"arm": arm, "seed": seed, "steps": steps})
    return curves
