"""Study configuration: shared settings + arms (method x optimizer x instruction placement) x seeds.

Every arm's TrainConfig is built from the same `train` block, so data order, precision, batch and
schedule are identical by construction; an arm may override single dotted keys (recorded and shown
in the results table).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ..config import Strict, TrainConfig, apply_overrides, config_hash
from ..data.formatting import Placement
from ..evaluation.config import EvalSettings
from ..losses import registry
from .design import BASE_METHODS, Question, ReportSettings, default_questions

__all__ = ["ArmSpec", "StudyConfig", "BASE_METHODS", "Question", "ReportSettings", "default_arms"]

ArmMethod = Literal[("baseline", *registry.method_names())]  # type: ignore[valid-type]  # baseline: no training


class ArmSpec(Strict):
    name: str
    method: ArmMethod
    optimizer: Literal["adamw", "adamw8bit", "grit"] = "adamw"
    placement: Placement | None = None  # None = the method's default
    overrides: dict[str, Any] = {}  # dotted TrainConfig keys, e.g. {"optimizer.lr": 1.0e-4}


def default_arms() -> list[ArmSpec]:
    return [ArmSpec(name="baseline", method="baseline"),
            ArmSpec(name="sft", method="sft"), ArmSpec(name="sft_grit", method="sft", optimizer="grit"),
            ArmSpec(name="dpo", method="dpo"), ArmSpec(name="dpo_grit", method="dpo", optimizer="grit"),
            ArmSpec(name="cita", method="cita"), ArmSpec(name="cita_grit", method="cita", optimizer="grit")]


class StudyConfig(Strict):
    study_dir: str = "runs/study"
    seeds: list[int] = [0]
    # TrainConfig fields shared by every arm (model, lora, data, method, optimizer, ...); each arm takes the
    # `method` settings its method has (registry.settings_for), so one block can hold beta and lambda_kl
    train: dict[str, Any] = {}
    grit: dict[str, Any] = {}  # GRIT settings used by every +GRIT arm
    evaluation: EvalSettings = Field(default_factory=EvalSettings)  # shared by every arm; model/adapter/out_dir per run
    arms: list[ArmSpec] = Field(default_factory=default_arms)
    report: ReportSettings = Field(default_factory=ReportSettings)
    questions: list[Question] = Field(default_factory=default_questions)  # research questions as named contrasts

    @model_validator(mode="after")
    def _check(self):
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        if not any(a.method == "baseline" for a in self.arms):
            raise ValueError("a study needs a baseline arm (method: baseline) to report ΔAQI against")
        for k in ("run_dir", "seed", "tensorboard_dir", "run_name"):
            if k in self.train:
                raise ValueError(f"train.{k} is set per run by the study; remove it")
        if self.grit:  # typed even when no arm uses GRIT, so a typo fails at load, not silently
            from ..grit.config import GritConfig

            try:
                GritConfig.model_validate(self.grit)
            except ValueError as e:
                raise ValueError(f"grit: invalid GRIT settings:\n{e}") from None
        ids = [q.id for q in self.questions]
        if len(set(ids)) != len(ids):
            raise ValueError(f"question ids must be unique, got {ids}")
        if self.questions != default_questions():  # the defaults may name arms a study leaves out (reported as missing)
            for q in self.questions:
                unknown = sorted(q.arms() - set(names))
                if unknown:
                    raise ValueError(f"questions: {q.id} names arm(s) {unknown} that are not in arms {names}")
        for arm in self.arms:  # fail now, not after hours of training, if an arm's config is invalid
            if arm.method != "baseline":
                self.arm_config(arm, self.seeds[0])
        self.eval_config(Path(self.study_dir) / "runs", None)  # ... or if the evaluation block is
        return self

    def eval_config(self, out_dir: str | Path, adapter: str | Path | None, behaviour: dict | None = None):
        """One run's EvalConfig: the shared `evaluation` block + this run's output and adapter
        (`behaviour`: that block's behaviour settings as the runner widened them for this arm)."""
        from ..config import InferenceModelSection
        from ..evaluation.config import EvalConfig

        model = {k: v for k, v in self.train.get("model", {}).items() if k in InferenceModelSection.model_fields}
        raw = {**self.evaluation.model_dump(), "out_dir": str(out_dir), "adapter": None if adapter is None else str(adapter),
               "model": model}
        if behaviour is not None:
            raw["behaviour"] = behaviour
        try:
            return EvalConfig.model_validate(raw)
        except Exception as e:
            raise ValueError(f"evaluation: invalid evaluation configuration:\n{e}") from None

    def run_id(self, arm: ArmSpec, seed: int) -> str:
        return f"{arm.name}-s{seed}"

    def arm_config(self, arm: ArmSpec, seed: int) -> TrainConfig:
        raw = copy.deepcopy(self.train)
        raw["run_dir"] = str(Path(self.study_dir) / "runs" / self.run_id(arm, seed))
        raw["seed"] = seed
        raw["tensorboard_dir"] = str(Path(self.study_dir) / "tensorboard")
        raw["run_name"] = self.run_id(arm, seed)
        raw["method"] = {**registry.settings_for(arm.method, raw.get("method", {})), "name": arm.method}
        if arm.placement is not None:
            raw["method"]["placement"] = arm.placement
        raw.setdefault("optimizer", {})["name"] = arm.optimizer
        if arm.optimizer == "grit":
            raw["optimizer"]["grit"] = {**self.grit, **raw["optimizer"].get("grit", {})}
        else:
            raw["optimizer"].pop("grit", None)
        raw = apply_overrides(raw, [f"{k}={_yaml_value(v)}" for k, v in arm.overrides.items()])
        try:
            return TrainConfig.model_validate(raw)
        except Exception as e:
            raise ValueError(f"arm {arm.name!r}: invalid training configuration:\n{e}") from None

    def baseline_hash(self, arm: ArmSpec, seed: int) -> str:
        return config_hash({"arm": arm.model_dump(), "seed": seed, "model": self.train.get("model", {}),
                            "evaluation": self.evaluation_fingerprint()})

    def evaluation_fingerprint(self) -> dict[str, Any]:
        """The evaluation settings that differ from the defaults: what a run's config hash covers.

        Defaults are left out so that the resolved study.yaml (every value written out) hashes like
        the sparse YAML it came from, and a new evaluation option with a default changes no hash."""
        return self.evaluation.model_dump(mode="json", exclude_defaults=True)


def _yaml_value(v: Any) -> str:
    import yaml

    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()
