"""Run a study: train every arm x seed with the one engine, evaluate each with the one evaluator
(baseline untrained), then write the paper's table and figures.

`StudyRunner` is the entry point the command line and notebooks use. It puts together the three parts:
planning (plan.py: which runs exist, their configs and hashes), execution (execution.py: claiming,
training and evaluating runs; pool.py: the local worker processes) and reporting (reporting.py).

Phases are resumable: the SQLite store says what is done. Training runs first (each resumes from
its latest checkpoint if it was interrupted), then evaluation loads the base model once and swaps
adapters, then the report is rebuilt from the store.

With `workers > 1`, or another launcher than `local`, the driver (driver.py) launches one
`ecliptica run-one` process per run or sweep point (launchers.py: local processes, SLURM jobs, Ray
tasks) and ingests their result files into the store; docs/scaling.md.

With `calibration` on, a calibration phase comes first: each trained arm's sweep is trained on the
train split and scored on the validation split (by the workers, each claiming sweep points, when
there are several), the config's rule picks each arm's settings, and only then are the final runs
registered, with them.
"""

from __future__ import annotations

from ..runio import DirLock
from .config import ArmSpec, StudyConfig
from .driver import Driver
from .execution import COMPILE_CACHE_VARS, RunExecutor
from .launchers import make_launcher
from .plan import StudyPlan, load_study
from .reporting import report_study, study_records

__all__ = ["StudyRunner", "load_study", "report_study", "study_records", "COMPILE_CACHE_VARS"]


class StudyRunner:
    def __init__(self, cfg: StudyConfig):
        self.planning = StudyPlan(cfg)
        self.executor = RunExecutor(self.planning)
        self.retried: list[dict] = []  # runs done after failed launches ({job, attempts}), from the driver

    # ---------------------------------------------------------------- the plan, as the notebooks read it
    @property
    def cfg(self) -> StudyConfig:
        return self.planning.cfg

    @property
    def dir(self):
        return self.planning.dir

    @property
    def store(self):
        return self.planning.store

    @property
    def plan(self) -> list[tuple[ArmSpec, int]]:
        return self.planning.plan

    @property
    def calibrated(self) -> dict[str, dict] | None:
        return self.planning.calibrated

    def calibrate(self) -> None:
        self.planning.calibrate()

    def arm_config(self, arm: ArmSpec, seed: int):
        return self.planning.arm_config(arm, seed)

    def run_id(self, arm: ArmSpec, seed: int) -> str:
        return self.planning.run_id(arm, seed)

    def _with_training_instruction(self, behaviour: dict, arm: ArmSpec, seed: int) -> dict:
        return self.planning.with_training_instruction(behaviour, arm, seed)

    # ---------------------------------------------------------------- phases
    def train_arm(self, name: str) -> list[dict]:
        """Train one arm (all seeds); returns the training summaries. Used by the per-arm notebooks."""
        if name not in {a.name for a in self.cfg.arms}:
            raise ValueError(f"no arm {name!r} in this study; arms: {[a.name for a in self.cfg.arms]}")
        with self._lock():
            self.store.release_all()  # claims of a killed earlier invocation (we hold the study)
            self.train_all(only=[name])
        return [self.store.get(self.run_id(a, s))["train_summary"] for a, s in self.plan if a.name == name]

    def train_all(self, only: list[str] | None = None) -> None:
        self.executor.train_all(only)

    def evaluate_all(self, only: list[str] | None = None) -> None:
        self.executor.evaluate_all(only)

    def records(self) -> list[dict]:
        return study_records(self.cfg)[0]

    def report(self) -> dict:
        return report_study(self.cfg)

    def _lock(self):
        """The driver holds the study directory; the processes it launches work under that hold."""
        return DirLock(self.dir, "study")

    def run(self, workers: int = 1, devices: list[str] | None = None, launcher=None) -> dict:
        """Run the study and write its report; an incomplete study raises instead, naming every run left.
        `launcher`: a launcher object (launchers.py), else the config's `launcher` block. With the local
        launcher and one worker, everything runs in this process. `retried` then lists the runs that were
        done only after failed launches: the study is complete, but the caller should say so."""
        section = self.cfg.launcher
        with self._lock():  # a second `ecliptica run` on this study stops here, naming this process
            if launcher is not None or workers > 1 or section.name != "local":
                from ..models import resolve_model_path

                resolve_model_path(self.cfg.train.get("model", {}).get("name", "smollm2-135m-instruct"))  # once, here
                self.store.release_all()  # claims left by a killed earlier driver (we hold the study)
                launcher = launcher or make_launcher(self.dir, section, workers, devices)
                driver = Driver(self.planning, launcher, section.max_attempts)
                try:
                    driver.run()
                finally:
                    self.retried = driver.retried
            else:
                self.store.release_all()  # claims left by a killed earlier invocation
                self.train_all()
                self.evaluate_all()
            result = self.report()
        print(f"\n[study] results: {self.dir / 'results.md'}")
        print(f"[study] training curves and eval/ scalars: tensorboard --logdir {self.dir / 'tensorboard'}")
        return result
