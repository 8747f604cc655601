"""Planning a study: which runs exist, their ids, configs and hashes, registered in the store.

Nothing here trains or evaluates. The execution part (execution.py, pool.py, launchers) asks a
`StudyPlan` what a run is; the reporting part (reporting.py) reads the run directories it names.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..config import config_hash, load_config, without_added_defaults
from .calibration import calibrate, chosen_settings, register_points
from .config import ArmSpec, StudyConfig
from .store import StudyStore


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    return load_config(path, overrides, cls=StudyConfig)


class StudyPlan:
    """The study's runs: every (arm, seed), each with its id, resolved TrainConfig, run directory and hash.

    With calibration on, the final runs are registered only once the sweep has chosen each arm's settings
    (`calibrated` is None until then)."""

    def __init__(self, cfg: StudyConfig, write_config: bool = True):
        self.cfg = cfg
        self.dir = Path(cfg.study_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store = StudyStore(self.dir / "study.sqlite")
        self.plan: list[tuple[ArmSpec, int]] = [(arm, seed) for seed in cfg.seeds for arm in cfg.planned_arms()]
        if cfg.calibration.enabled:  # now, so a changed setting is refused before any work
            register_points(cfg, self.store)
        # each trained arm's calibrated settings ({} without calibration); None until the sweep is done
        self.calibrated = chosen_settings(cfg, self.store)
        if self.calibrated is not None:
            self.register_plan()
        # workers read this file; only the coordinator writes it, once the store accepted the calibration points
        # and (with the sweep done) the final runs; workers share the sweep, so it cannot wait for the choice
        if write_config:
            tmp = self.dir / "study.yaml.tmp"
            tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
            tmp.replace(self.dir / "study.yaml")

    @classmethod
    def detached(cls, cfg: StudyConfig, calibrated: dict[str, dict] | None) -> StudyPlan:
        """The plan as a job process sees it: from the files the driver wrote, without the store."""
        self = cls.__new__(cls)
        self.cfg, self.dir, self.store, self.calibrated = cfg, Path(cfg.study_dir), None, calibrated
        self.plan = [(arm, seed) for seed in cfg.seeds for arm in cfg.arms]
        return self

    def register_plan(self) -> None:
        for arm, seed in self.plan:
            self.store.register(self.run_id(arm, seed), arm.name, seed, self.hash(arm, seed), self.describe(arm, seed))

    def calibrate(self) -> None:
        """The calibration phase (resumable); afterwards the final runs are registered with the choices."""
        if self.calibrated is None:
            self.calibrated = calibrate(self.cfg, self.store)
            self.register_plan()

    def arm_config(self, arm: ArmSpec, seed: int):
        """The final run's TrainConfig: the study's shared settings + the arm's + its calibrated choice."""
        if self.calibrated is None:
            raise RuntimeError("calibration is unfinished; call calibrate() first")
        return self.cfg.arm_config(arm, seed, self.calibrated.get(arm.name))

    def run_id(self, arm: ArmSpec, seed: int) -> str:
        return self.cfg.run_id(arm, seed)

    def describe(self, arm: ArmSpec, seed: int) -> dict:
        # keys added by later versions appear only when used, so existing stores keep their hashes
        d = {
            "arm": arm.model_dump(exclude={"instruction"} if arm.instruction is None else None),
            "seed": seed,
            "evaluation": self.cfg.evaluation_fingerprint(),
        }
        if self.cfg.evaluation_sets:
            d["evaluation_sets"] = self.cfg.eval_sets()
        if arm.trained:
            d["train"] = without_added_defaults(self.arm_config(arm, seed).model_dump(mode="json"))
        else:
            d["model"] = self.cfg.train.get("model", {})
        if arm.method == "prompt_only":
            d["instruction"] = self.cfg.prompt_instruction(arm)
        return d

    def hash(self, arm: ArmSpec, seed: int) -> str:
        return config_hash(self.describe(arm, seed))

    def run_dir(self, arm: ArmSpec, seed: int) -> Path:
        if not arm.trained:
            return self.dir / "runs" / self.run_id(arm, seed)
        return Path(self.arm_config(arm, seed).run_dir)

    def with_training_instruction(self, behaviour: dict, arm: ArmSpec, seed: int) -> dict:
        """Behaviour settings that also evaluate with the instruction an arm was trained with (same text,
        same placement); the baseline gets every such variant, so each arm has a base to compare with.
        The headline (`behaviour.shown_placement`) stays as configured, `none` by default: comparable
        across arms. Arms trained on per-row instructions have no single text and keep `none` only."""
        arms = [a for a in self.cfg.arms if a.trained] if arm.method == "baseline" else [arm]
        placements = list(behaviour.get("placements", ["none"]))
        instruction = behaviour.get("instruction")
        for a in arms:
            tc = self.cfg.arm_config(a, seed)  # placement and instruction: calibration does not change them
            placement, text = tc.method.placement or default_placement(a.method), tc.data.instruction
            if placement != "none" and (instruction or text):
                instruction = instruction or text
                placements = list(dict.fromkeys([*placements, placement]))
        return {**behaviour, "placements": placements, **({"instruction": instruction} if instruction else {})}


def default_placement(method: str) -> str:
    from ..losses import get_method

    return get_method(method).default_placement
