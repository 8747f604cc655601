"""Typed evaluation configuration (YAML via `ecliptica.config.load_config(path, overrides, cls=EvalConfig)`).

Unknown keys are errors (the `Strict` base). Every field is documented in docs/evaluation.md.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ecliptica.config import InferenceModelSection, Strict

PlacementName = Literal["system", "prepend", "none"]


EvalModelSection = InferenceModelSection  # the model fields that matter for inference


class EvalDataSection(Strict):
    path: str = "demo:eval"
    format: Literal["litmus", "xstest", "donotanswer", "generic"] = "generic"
    benign_path: str | None = None  # a second source, e.g. safe prompts next to Do-Not-Answer
    benign_format: Literal["litmus", "xstest", "donotanswer", "generic"] = "generic"
    limit: int | None = Field(None, ge=1)  # balanced subset across (axiom, label)
    per_group: int | None = Field(None, ge=1)  # cap per (axiom, label) group (LITMUS-style balancing)
    seed: int = 0
    on_bad_row: Literal["error", "skip"] = "error"


class EmbeddingsSection(Strict):
    pooling: Literal["mean", "last"] = "mean"
    layer: int = -1  # hidden_states index: 0 = token embeddings, -1 = last (final-normed for Llama)
    layer_sweep: bool = False  # embed every layer; AQI per layer as a curve
    placement: PlacementName = "none"
    instruction: str | None = None
    max_length: int = Field(512, ge=8)
    batch_size: int = Field(16, ge=1)
    pca_dim: int | None = Field(None, ge=1)


class MetricsSection(Strict):
    gamma: float = Field(0.5, ge=0.0, le=1.0)
    n_resamples: int = Field(1000, ge=1000)
    seed: int = 0
    alpha: float = Field(0.05, gt=0.0, lt=1.0)
    legacy: bool = False  # also report the per-run-normalised reference scores (not comparable)


class BehaviourSection(Strict):
    enabled: bool = True
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(512, ge=8)
    limit: int | None = Field(None, ge=1)  # balanced subset of the eval prompts
    # The with/without-instruction variants: e.g. [none, system] measures both.
    placements: list[PlacementName] = ["none"]
    instruction: str | None = None  # default: embeddings.instruction


class DriftSection(Strict):
    enabled: bool = True
    path: str = "demo:preferences"
    format: str = "generic"  # any preference format
    category: str | None = "benign"  # keep pairs of this category (null: every pair)
    limit: int | None = Field(None, ge=1)
    placement: PlacementName = "none"
    max_length: int = Field(1024, ge=16)
    batch_size: int = Field(8, ge=1)
    collapse_ratio: float = Field(2.0, gt=1.0)  # collapsed when perplexity / base perplexity exceeds it


class FiguresSection(Strict):
    enabled: bool = True
    tsne: bool = False


class EvalSettings(Strict):
    """Everything but the per-run fields: what a study's `evaluation:` block holds, shared by every arm."""

    cache_dir: str | None = None  # embeddings cache; default <ECLIPTICA_CACHE>/embeddings
    merge_adapter: bool = False  # merge for speed (full-precision base only; never into 4-bit)
    progress: bool = True
    data: EvalDataSection = Field(default_factory=EvalDataSection)
    embeddings: EmbeddingsSection = Field(default_factory=EmbeddingsSection)
    metrics: MetricsSection = Field(default_factory=MetricsSection)
    behaviour: BehaviourSection = Field(default_factory=BehaviourSection)
    drift: DriftSection = Field(default_factory=DriftSection)
    figures: FiguresSection = Field(default_factory=FiguresSection)

    @model_validator(mode="after")
    def _check_instructions(self):
        if self.embeddings.placement != "none" and not self.embeddings.instruction:
            raise ValueError("embeddings.placement is not 'none' but embeddings.instruction is empty")
        if any(p != "none" for p in self.behaviour.placements) and not self.behaviour_instruction:
            raise ValueError("behaviour.placements asks for an instruction but none is set "
                             "(behaviour.instruction or embeddings.instruction)")
        if len(set(self.behaviour.placements)) != len(self.behaviour.placements):
            raise ValueError("behaviour.placements has duplicates")
        return self

    @property
    def behaviour_instruction(self) -> str | None:
        return self.behaviour.instruction or self.embeddings.instruction


class EvalConfig(EvalSettings):
    """One evaluation: the shared settings plus which model and adapter, and where to write."""

    out_dir: str = "runs/eval"
    adapter: str | None = None  # LoRA adapter directory; null evaluates the base
    model: EvalModelSection = Field(default_factory=EvalModelSection)

    @model_validator(mode="after")
    def _check_merge(self):
        if self.merge_adapter and self.model.load_in_4bit:
            raise ValueError("merge_adapter with load_in_4bit: never merge into a 4-bit base (see docs)")
        return self
