"""The study's analysis design, declared in the study YAML: report settings and the research
questions as named contrasts of arms (the report holds no arm names of its own).

A contrast is ``Σ weight · metric(arm)`` with weights summing to 0: ``{cita: 1, dpo: -1}`` is
CITA minus DPO; ``{cita_grit: 1, cita: -1, dpo_grit: -1, dpo: 1}`` is an interaction. Each
question's contrasts (times their metrics) are one family for the Holm correction.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from ..config import Strict

# The methods the default research questions (Q2, Q4) are about: question content, not the method list
# (that is ecliptica.losses.registry). A study that asks about other methods declares its own `questions:`.
BASE_METHODS = ("sft", "dpo", "cita")

MetricName = Literal["aqi", "refusal_rate_unsafe", "over_refusal_rate_safe"]
ALL_METRICS: tuple[MetricName, ...] = ("aqi", "refusal_rate_unsafe", "over_refusal_rate_safe")


class MinEffect(Strict):
    """Smallest difference that matters, per metric: a "no difference" claim needs the whole CI
    inside ±this margin (equivalence); a CI reaching beyond it without significance is inconclusive."""

    aqi: float = Field(0.01, gt=0)
    refusal_rate_unsafe: float = Field(0.05, gt=0)  # 5 percentage points
    over_refusal_rate_safe: float = Field(0.05, gt=0)


class ReportSettings(Strict):
    n_resamples: int = Field(1000, ge=10)  # prompt bootstrap resamples; p-value resolution is 2/(R+1)
    seed: int = 0
    alpha: float = Field(0.05, gt=0.0, lt=1.0)  # family-wise, per research question (Holm)
    min_effect: MinEffect = Field(default_factory=MinEffect)


class Contrast(Strict):
    terms: dict[str, float]  # arm -> weight; weights sum to 0
    name: str | None = None  # default: "a − b" for a simple pair
    metrics: list[MetricName] = list(ALL_METRICS)
    higher: str | None = None  # wording when positive / negative (default: "<arm> higher")
    lower: str | None = None
    only_if_present: bool = False  # leave out (instead of "not answerable") when an arm is missing

    @model_validator(mode="after")
    def _check(self):
        if len(self.terms) < 2:
            raise ValueError(f"a contrast needs at least two arms, got {self.terms}")
        if not math.isclose(sum(self.terms.values()), 0.0, abs_tol=1e-9):
            raise ValueError(f"contrast weights must sum to 0, got {self.terms}")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        pos = [a for a, w in self.terms.items() if w > 0]
        neg = [a for a, w in self.terms.items() if w < 0]
        if self.is_simple_pair:
            return f"{pos[0]} − {neg[0]}"
        return " ".join(f"{'+' if w > 0 else '−'} {abs(w):g}·{a}" for a, w in self.terms.items()).lstrip("+ ")

    @property
    def is_simple_pair(self) -> bool:
        return sorted(self.terms.values()) == [-1.0, 1.0]


class Overhead(Strict):
    """Cost of `treated` over `base` (time, VRAM), weighed against the AQI contrast treated − base."""

    base: str
    treated: str


class Question(Strict):
    id: str
    title: str
    contrasts: list[Contrast] = []
    placement_pairs: bool = False  # add every pair of arms that differ only in instruction placement
    efficiency: bool = False  # ΔAQI vs the baseline per compute-hour, for every arm
    overheads: list[Overhead] = []
    notes: list[str] = []

    def arms(self) -> set[str]:
        named = {a for c in self.contrasts for a in c.terms}
        return named | {a for o in self.overheads for a in (o.base, o.treated)}


def default_questions() -> list[Question]:
    """Q1–Q4 of the study plan (docs/study.md)."""
    grit_pairs = [Contrast(terms={f"{m}_grit": 1.0, m: -1.0}) for m in BASE_METHODS]
    return [
        Question(
            id="Q1",
            title="Q1: does instruction conditioning help (CITA vs DPO; placement alone)?",
            contrasts=[
                Contrast(terms={"cita": 1.0, "dpo": -1.0}),
                Contrast(terms={"cita_grit": 1.0, "dpo_grit": -1.0}, metrics=["aqi"], only_if_present=True),
            ],
            placement_pairs=True,
            notes=[
                "CITA vs DPO changes the loss (KL anchor) as well as the instruction, so it is the method "
                "effect, not the instruction alone."
            ],
        ),
        Question(id="Q2", title="Q2: does GRIT help each base method (X_grit − X)?", contrasts=grit_pairs),
        Question(
            id="Q3",
            title="Q3: do the effects stack (CITA + GRIT)?",
            contrasts=[
                Contrast(terms={"cita_grit": 1.0, "dpo": -1.0}, metrics=["aqi"]),
                Contrast(
                    terms={"cita_grit": 1.0, "cita": -1.0, "dpo_grit": -1.0, "dpo": 1.0},
                    name="(cita_grit − cita) − (dpo_grit − dpo)",
                    metrics=["aqi"],
                    higher="super-additive: GRIT helps CITA more than DPO",
                    lower="sub-additive: GRIT helps CITA less than DPO",
                ),
            ],
            notes=[
                "An interaction CI covering 0 means the data are compatible with additive effects; it does "
                "not show that they are additive."
            ],
        ),
        Question(
            id="Q4",
            title="Q4: is the cost justified (ΔAQI per GPU-hour, GRIT overhead)?",
            efficiency=True,
            overheads=[Overhead(base=m, treated=f"{m}_grit") for m in BASE_METHODS],
            notes=[
                "Compute-hours = train_seconds × num_processes / device_shared_by / 3600 per run (mean over "
                "seeds); evaluation time is not included. ΔAQI per hour treats the hours as fixed, so its "
                "CI is the ΔAQI CI scaled."
            ],
        ),
    ]
