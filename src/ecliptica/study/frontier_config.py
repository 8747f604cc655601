"""The matched-drift (frontier) design and the convergence analysis, as study config blocks.

`frontier:` runs every trained arm over a grid of learning rates and evaluates each run at several
training steps. Each (arm, seed) then has a set of points (benign token KL to the base, outcomes); the
arms are compared at named KL levels by interpolating along those points (study/frontier.py), so a
method that merely takes larger steps is not credited for drifting further.

`convergence:` reads each frontier run's validation curve (metrics.jsonl) and compares every arm with
its GRIT twin by steps (and GPU-seconds) to a fixed level and by the area under the curve
(study/convergence.py).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from ..config import Strict

# Outcomes with a per-prompt (or per-pair) vector in each evaluation's directory, so their CIs resample prompts:
# refusal of unsafe and over-refusal of safe prompts (generations.jsonl), held-out pair accuracy
# (preference_pairs.jsonl).
PROMPT_OUTCOMES = ("refusal_rate_unsafe", "over_refusal_rate_safe", "preference_accuracy")


class FrontierSection(Strict):
    """Each trained arm x `lrs` x seeds is one run of `max(steps)` steps, evaluated at every step in `steps`."""

    enabled: bool = False
    lrs: list[float] = Field(default_factory=lambda: [1.0e-5, 3.0e-5, 1.0e-4], min_length=1)
    steps: list[int] = Field(default_factory=lambda: [20, 40, 60], min_length=1)  # checkpoints evaluated
    kl_levels: list[float] = Field(default_factory=lambda: [0.01, 0.03, 0.1], min_length=1)
    # per-prompt outcomes read from each evaluation's per-prompt files (PROMPT_OUTCOMES)
    outcomes: list[Literal[PROMPT_OUTCOMES]] = list(PROMPT_OUTCOMES)  # type: ignore[valid-type]
    # outcomes with one number per evaluation: name -> dotted key in eval.json (e.g. aqi: aqi_layers.discriminant.aqi).
    # An evaluation without the key has no value for it; the report names the points that lack it.
    scalar_outcomes: dict[str, str] = Field(
        default_factory=lambda: {"aqi": "aqi_layers.discriminant.aqi"},
    )
    # the primary rule, and the second one whose disagreement with it is reported as the interpolation's own error
    interpolation: Literal["linear_log_kl"] = "linear_log_kl"
    n_resamples: int = Field(1000, ge=10)  # draws of (seeds, prompts, drift examples)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        for name in ("lrs", "kl_levels"):
            values = getattr(self, name)
            if any(v <= 0 for v in values) or len(set(values)) != len(values):
                raise ValueError(f"frontier.{name} must be distinct positive numbers, got {values}")
        if any(s < 1 for s in self.steps) or len(set(self.steps)) != len(self.steps):
            raise ValueError(f"frontier.steps must be distinct positive step counts, got {self.steps}")
        clash = set(self.outcomes) & set(self.scalar_outcomes)
        if clash:
            raise ValueError(f"frontier.scalar_outcomes names {sorted(clash)}, which are per-prompt outcomes")
        return self

    @property
    def max_steps(self) -> int:
        return max(self.steps)

    @property
    def save_every(self) -> int:
        """The checkpoint interval that lands on every evaluated step."""
        return math.gcd(*self.steps)

    @property
    def keep_checkpoints(self) -> int:
        return self.max_steps // self.save_every

    def train_overrides(self) -> dict[str, int]:
        """What every trained run of a frontier study trains with: checkpoints kept at every evaluated step."""
        if not self.enabled:
            return {}
        return {
            "train.max_steps": self.max_steps,
            "train.save_every": self.save_every,
            "train.keep_checkpoints": self.keep_checkpoints,
        }

    def outcome_names(self) -> list[str]:
        return [*self.outcomes, *self.scalar_outcomes]


class ConvergenceSection(Strict):
    """Steps (and GPU-seconds) until the validation metric first reaches `level`, and the area under its curve
    normalised by the step range (the curve's mean height), for each arm and its GRIT twin, over seeds."""

    enabled: bool = True  # (with frontier on) reads the frontier runs' metrics.jsonl
    metric: str = "val/pref_accuracy"  # a key of metrics.jsonl rows
    higher_is_better: bool = True  # False for a loss: "reach" means <= level
    level: float = 0.6
    compute_key: str = "gpu_seconds"  # cumulative compute at that row
    step_key: str = "step"
