"""Evaluation: AQI on hidden states, refusal behaviour, jailbreaks, held-out preference accuracy, capability drift (docs/evaluation.md, docs/aqi.md).

Names are imported lazily so the metric modules (`aqi`, `cluster_indices`, `linear_probe`, `stats`, ...)
import without torch/transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EvalConfig": "config",
    "run_eval": "runner",
    "ModelHandle": "model_handle",
    "EmbeddingsSection": "config",
    "MetricsSection": "config",
    "Embeddings": "embeddings",
    "embed_prompts": "embeddings",
    "compute_embeddings": "embeddings",
    "load_eval_prompts": "prompts",
    "balanced_subset": "prompts",
    "evaluate_embeddings": "scoring",
    "layer_report": "scoring",
    "headline_band": "discriminant",
    "generate_greedy": "behaviour",
    "run_behaviour": "behaviour",
    "run_jailbreaks": "behaviour",
    "build_judge": "judges",
    "ModelJudge": "judges",
    "load_benign_pairs": "drift",
    "run_drift": "drift",
    "paired_difference": "drift",
    "run_preference": "preference",
    "sequence_scores": "logprobs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ecliptica.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
