"""Study configuration: shared settings + arms (method x optimizer x instruction placement) x seeds.

Every arm's TrainConfig is built from the same `train` block, so data order, precision, batch and
schedule are identical by construction; an arm may override single dotted keys (recorded and shown
in the results table). With `calibration` on, each trained arm's learning rate (and GRIT damping) is
chosen per arm on the validation split before the final runs (study/calibration.py).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..config import Strict, TrainConfig, apply_overrides
from ..data.formatting import Placement
from ..evaluation.config import EvalDataSection, EvalSettings
from ..losses import registry
from ..runio import check_path_component
from .design import BASE_METHODS, Question, ReportSettings, default_questions
from .frontier_config import ConvergenceSection, FrontierSection
from .launch_config import LauncherSection
from .train_block import SharedTrain, check_train_block

__all__ = [
    "ArmSpec",
    "CalibrationSection",
    "StudyConfig",
    "BASE_METHODS",
    "Question",
    "ReportSettings",
    "UNTRAINED",
    "default_arms",
]

# Arms evaluated without training: the base as is, and the base with the instruction as system message
# (separates "the instruction helps" from "training on it helps").
UNTRAINED = ("baseline", "prompt_only")

ArmMethod = Literal[(*UNTRAINED, *registry.method_names())]  # type: ignore[valid-type]


class ArmSpec(Strict):
    name: str
    method: ArmMethod
    optimizer: Literal["adamw", "adamw8bit", "grit"] = "adamw"
    placement: Placement | None = None  # None = the method's default
    overrides: dict[str, Any] = {}  # dotted TrainConfig keys, e.g. {"optimizer.lr": 1.0e-4}
    instruction: str | None = None  # prompt_only: the system message (default: train.data.instruction)

    @property
    def trained(self) -> bool:
        return self.method not in UNTRAINED


class CalibrationSection(Strict):
    """Per trained arm, a learning-rate sweep (x `grit_dampings` for GRIT arms), trained on the train split
    with seed `seed` and scored on the validation split. The rule is fixed here, before any result:
    the highest validation preference accuracy among points whose benign token KL to the base is at most
    `kl_bound`; accuracies within `accuracy_tolerance` of the best tie, and ties go to the smaller lr, then
    the smaller KL; if no point meets the bound, the point with the smallest KL (marked infeasible)."""

    enabled: bool = False
    arms: list[str] | None = None  # arms to calibrate (None: every trained arm); the others keep the shared settings
    rule: Literal["max_val_accuracy_within_kl"] = "max_val_accuracy_within_kl"
    lrs: list[float] = Field(default_factory=lambda: [3.0e-5, 1.0e-4, 3.0e-4], min_length=1)
    grit_dampings: list[float] = []  # empty: GRIT arms sweep lr only, at the study's GRIT damping
    max_steps: int | None = Field(None, ge=1)  # None: the final runs' train.train.max_steps
    seed: int = 0
    kl_bound: float = Field(0.05, gt=0)
    accuracy_tolerance: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1)  # validation and benign pairs per scoring forward
    # beta of the implicit reward r = beta * (log pi - log pi_base) the validation pairs are scored with: one
    # value for every arm (SFT has no beta of its own), so margins compare; accuracy does not depend on it
    reward_beta: float = Field(0.1, gt=0)

    @model_validator(mode="after")
    def _check(self):
        for name in ("lrs", "grit_dampings"):
            values = getattr(self, name)
            if any(v <= 0 for v in values) or len(set(values)) != len(values):
                raise ValueError(f"calibration.{name} must be distinct positive numbers, got {values}")
        return self


def default_arms() -> list[ArmSpec]:
    return [
        ArmSpec(name="baseline", method="baseline"),
        ArmSpec(name="sft", method="sft"),
        ArmSpec(name="sft_grit", method="sft", optimizer="grit"),
        ArmSpec(name="dpo", method="dpo"),
        ArmSpec(name="dpo_grit", method="dpo", optimizer="grit"),
        ArmSpec(name="cita", method="cita"),
        ArmSpec(name="cita_grit", method="cita", optimizer="grit"),
    ]


class StudyConfig(Strict):
    study_dir: str = "runs/study"
    seeds: list[int] = [0]
    # TrainConfig fields shared by every arm (model, lora, data, method, optimizer, ...); each arm takes the
    # `method` settings its method has (registry.settings_for), so one block can hold beta and lambda_kl, and
    # the GRIT arms take `optimizer.grit`. Checked at load (study/train_block.py); `shared_train()` is its typed view.
    train: dict[str, Any] = {}
    evaluation: EvalSettings = Field(default_factory=EvalSettings)  # shared by every arm; model/adapter/out_dir per run
    # Named evaluation prompt sets, e.g. {dev: ..., test: ...}: every run is evaluated on each, and the
    # table and research questions read `test` only. Empty: the one set in evaluation.data (no dev/test split).
    evaluation_sets: dict[str, EvalDataSection] = {}
    arms: list[ArmSpec] = Field(default_factory=default_arms)
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    report: ReportSettings = Field(default_factory=ReportSettings)
    questions: list[Question] = Field(default_factory=default_questions)  # research questions as named contrasts
    frontier: FrontierSection = Field(default_factory=FrontierSection)  # matched drift (study/frontier.py)
    convergence: ConvergenceSection = Field(default_factory=ConvergenceSection)  # Q2 as convergence
    launcher: LauncherSection = Field(default_factory=LauncherSection)  # where runs run (docs/scaling.md)

    @model_validator(mode="before")
    @classmethod
    def _grit_in_one_place(cls, raw):
        if isinstance(raw, dict) and "grit" in raw:
            raise ValueError(
                "grit: GRIT settings belong in train.optimizer.grit (taken by every arm with optimizer: grit); "
                "move the block there"
            )
        return raw

    @field_validator("train")
    @classmethod
    def _typed_train(cls, v):  # a typo or a bad value fails at load, naming train.<key>
        check_train_block(v)
        return v

    @model_validator(mode="after")
    def _check(self):
        # names joined onto study_dir: run ids and calibration points (runs/<arm>-s<seed>,
        # calibration/<arm>-lr<lr>) and evaluation sets (runs/<run>/eval/<set>) must stay inside it
        for i, arm in enumerate(self.arms):
            check_path_component(arm.name, f"arms[{i}].name")
        for name in self.evaluation_sets:
            check_path_component(name, "evaluation_sets (a set's name)")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        if not any(a.method == "baseline" for a in self.arms):
            raise ValueError("a study needs a baseline arm (method: baseline) to report ΔAQI against")
        ids = [q.id for q in self.questions]
        if len(set(ids)) != len(ids):
            raise ValueError(f"question ids must be unique, got {ids}")
        if self.questions != default_questions():  # the defaults may name arms a study leaves out (reported as missing)
            for q in self.questions:
                unknown = sorted(q.arms() - set(names))
                if unknown:
                    raise ValueError(f"questions: {q.id} names arm(s) {unknown} that are not in arms {names}")
        for arm in self.arms:  # fail now, not after hours of training, if an arm's config is invalid
            if arm.trained:
                self.arm_config(arm, self.seeds[0])
                swept = {"optimizer.lr", "optimizer.grit.damping"} & set(arm.overrides)
                if self.calibration.enabled and swept:
                    raise ValueError(f"arm {arm.name!r} overrides {sorted(swept)}, which calibration chooses")
            if arm.instruction is not None and arm.method != "prompt_only":
                raise ValueError(f"arm {arm.name!r}: `instruction` applies to prompt_only arms only")
            if arm.method == "prompt_only" and not self.prompt_instruction(arm):
                raise ValueError(
                    f"arm {arm.name!r} (prompt_only) needs an instruction: set the arm's "
                    "`instruction` or train.data.instruction"
                )
        # names of arms a study leaves out are ignored (e.g. `--set arms=...` on a shipped config); untrained ones are errors
        untrained = set(self.calibration.arms or []) & {a.name for a in self.arms if not a.trained}
        if untrained:
            raise ValueError(f"calibration.arms names {sorted(untrained)}, which are not trained arms of this study")
        if self.calibration.enabled and not self.shared_train().data.val_fraction > 0:
            raise ValueError("calibration needs a validation split: set train.data.val_fraction > 0")
        if self.evaluation_sets:
            if "test" not in self.evaluation_sets:
                raise ValueError(
                    f"evaluation_sets needs a `test` set (the report reads it), got {sorted(self.evaluation_sets)}"
                )
            if self.evaluation.data != EvalDataSection():  # (a default block written out in study.yaml is fine)
                raise ValueError(
                    "evaluation.data and evaluation_sets are both set: name the prompt sets in evaluation_sets only"
                )
        self.eval_config(Path(self.study_dir) / "runs", None)  # ... or if the evaluation block is
        if self.frontier.enabled:
            from .frontier_runs import check_frontier

            check_frontier(self)
        return self

    def planned_arms(self) -> list[ArmSpec]:
        """Every arm that is run: the declared ones and, with the frontier on, each trained arm at its other lrs."""
        from .frontier_runs import frontier_arms

        return [*self.arms, *frontier_arms(self)]

    def calibrated_arms(self) -> list[ArmSpec]:
        """The arms the calibration phase sweeps (none when it is off)."""
        if not self.calibration.enabled:
            return []
        names = self.calibration.arms
        return [a for a in self.arms if a.trained and (names is None or a.name in names)]

    def shared_train(self) -> SharedTrain:
        """The `train` block, typed (its defaults filled in)."""
        return check_train_block(self.train)

    def prompt_instruction(self, arm: ArmSpec) -> str | None:
        return arm.instruction or self.shared_train().data.instruction

    def eval_sets(self) -> dict[str, dict]:
        """Evaluation prompt sets by name; without `evaluation_sets`, the one set is reported as `test`."""
        if self.evaluation_sets:
            return {k: v.model_dump() for k, v in self.evaluation_sets.items()}
        return {"test": self.evaluation.data.model_dump()}

    def eval_config(
        self,
        out_dir: str | Path,
        adapter: str | Path | None,
        behaviour: dict | None = None,
        data: dict | None = None,
        system_instruction: str | None = None,
    ):
        """One run's EvalConfig: the shared `evaluation` block + this run's output and adapter
        (`behaviour`: that block's behaviour settings as the runner widened them for this arm; `data`: one
        of `eval_sets()`; `system_instruction`: a prompt-only arm's system message)."""
        from ..config import InferenceModelSection
        from ..evaluation.config import EvalConfig

        model = {k: v for k, v in self.train.get("model", {}).items() if k in InferenceModelSection.model_fields}
        raw = {
            **self.evaluation.model_dump(),
            "out_dir": str(out_dir),
            "adapter": None if adapter is None else str(adapter),
            "model": model,
        }
        if behaviour is not None:
            raw["behaviour"] = behaviour
        if data is not None:
            raw["data"] = data
        if system_instruction is not None:  # for embeddings and generations
            raw = {
                **raw,
                "embeddings": {**raw["embeddings"], "placement": "system", "instruction": system_instruction},
                "behaviour": {
                    **raw["behaviour"],
                    "placements": ["system"],
                    "shown_placement": "system",
                    "instruction": system_instruction,
                },
            }
        try:
            return EvalConfig.model_validate(raw)
        except Exception as e:
            raise ValueError(f"evaluation: invalid evaluation configuration:\n{e}") from None

    def run_id(self, arm: ArmSpec, seed: int) -> str:
        return f"{arm.name}-s{seed}"

    def arm_config(self, arm: ArmSpec, seed: int, calibrated: dict[str, Any] | None = None) -> TrainConfig:
        """The arm's TrainConfig; `calibrated` holds the dotted keys calibration chose (applied last)."""
        raw = copy.deepcopy(self.train)
        raw["run_dir"] = str(Path(self.study_dir) / "runs" / self.run_id(arm, seed))
        raw["seed"] = seed
        raw["tensorboard_dir"] = str(Path(self.study_dir) / "tensorboard")
        raw["run_name"] = self.run_id(arm, seed)
        raw["method"] = {**registry.settings_for(arm.method, raw.get("method", {})), "name": arm.method}
        if arm.placement is not None:
            raw["method"]["placement"] = arm.placement
        raw.setdefault("optimizer", {})["name"] = arm.optimizer
        if arm.optimizer != "grit":  # the shared GRIT settings are for the GRIT arms only
            raw["optimizer"].pop("grit", None)
        settings = {**self.frontier.train_overrides(), **arm.overrides, **(calibrated or {})}
        raw = apply_overrides(raw, [f"{k}={_yaml_value(v)}" for k, v in settings.items()])
        try:
            return TrainConfig.model_validate(raw)
        except Exception as e:
            raise ValueError(f"arm {arm.name!r}: invalid training configuration:\n{e}") from None

    def evaluation_fingerprint(self) -> dict[str, Any]:
        """The evaluation settings that differ from the defaults: what a run's config hash covers.

        Defaults are left out so that the resolved study.yaml (every value written out) hashes like
        the sparse YAML it came from, and a new evaluation option with a default changes no hash."""
        return self.evaluation.model_dump(mode="json", exclude_defaults=True)


def _yaml_value(v: Any) -> str:
    import yaml

    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()
