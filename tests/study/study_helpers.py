"""What the study tests share: the overrides that shrink configs/study_demo.yaml to a tiny model, a few steps and a
few prompts."""

from __future__ import annotations


def tiny_study_overrides(study_dir, model_dir, steps: int) -> list[str]:
    """The demo study on the tiny model: `steps` training steps, 16 pairs, 48 prompts (8 generated from, 4 tokens
    each), 4 drift pairs, the embedding cache inside the study. Callers add their arms and study_dir."""
    return [
        f"train.model.name={model_dir}",
        f"train.train.max_steps={steps}",
        "train.train.progress=false",
        "train.data.limit=16",
        "evaluation.data.limit=48",
        "evaluation.behaviour.limit=8",
        "evaluation.behaviour.max_new_tokens=4",
        "evaluation.drift.limit=4",
        f"evaluation.cache_dir={study_dir}/cache",
        "evaluation.progress=false",
    ]
