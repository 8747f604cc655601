"""Run a study: train every arm x seed with the one engine, evaluate each with the one evaluator
(baseline untrained), then write the paper's table and figures.

`StudyRunner` is the entry point the command line and notebooks use. It puts together the three parts:
planning (plan.py: which runs exist, their configs and hashes), execution (execution.py: claiming,
training and evaluating runs; pool.py: the local worker processes) and reporting (reporting.py).

Phases are resumable: the SQLite store says what is done. Training runs first (each resumes from
its latest checkpoint if it was interrupted), then evaluation loads the base model once and swaps
adapters, then the report is rebuilt from the store.

With `workers > 1` the runs are spread over worker processes (one per GPU, or several sharing one
GPU when a small model leaves it idle): each worker claims runs in the store, so every run is
trained and evaluated exactly once, by the same code as the single-process path.

With `calibration` on, a calibration phase comes first: each trained arm's sweep is trained on the
train split and scored on the validation split (by the workers, each claiming sweep points, when
there are several), the config's rule picks each arm's settings, and only then are the final runs
registered, with them.
"""

from __future__ import annotations

from ..runio import DirLock
from .config import ArmSpec, StudyConfig
from .execution import COMPILE_CACHE_VARS, RunExecutor
from .plan import StudyPlan, load_study
from .pool import WorkerPool
from .reporting import report_study, study_records

__all__ = ["StudyRunner", "load_study", "report_study", "study_records", "COMPILE_CACHE_VARS"]


class StudyRunner:
    def __init__(self, cfg: StudyConfig, worker: str | None = None):
        """`worker` names a worker process started by `run(workers=N)`; it claims runs before touching them."""
        self.planning = StudyPlan(cfg, write_config=worker is None)
        self.executor = RunExecutor(self.planning, worker)
        self.pool = WorkerPool(self.planning)
        self.crashed_workers: list[dict] = []

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

    @property
    def worker(self) -> str | None:
        return self.executor.worker

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

    def work(self) -> None:
        self.executor.work()

    def records(self) -> list[dict]:
        return study_records(self.cfg)[0]

    def report(self) -> dict:
        return report_study(self.cfg)

    def _lock(self):
        """The coordinator holds the study directory; its workers (started by it) work under that hold."""
        return DirLock(self.dir, "study") if self.worker is None else _NoLock()

    def _abandon(self, worker: str) -> None:
        self.pool.abandon(worker)

    def run(self, workers: int = 1, devices: list[str] | None = None) -> dict:
        """Run the study and write its report; an incomplete study raises instead, naming every run left.
        With workers, `crashed_workers` then lists each worker that exited abnormally although the others
        redid all it held ({name, returncode, log}): the study is complete, but the caller should say so."""
        self.crashed_workers = self.pool.crashed = []
        with self._lock():  # a second `ecliptica run` on this study stops here, naming this process
            if workers > 1:
                if self.calibrated is None:  # workers score the sweep points; the choice is made here
                    self.pool.run(workers, devices, phase="calibration")
                self.calibrate()
                self.pool.run(workers, devices)
            else:
                self.store.release_all()  # claims left by a killed earlier invocation
                self.train_all()
                self.evaluate_all()
            result = self.report()
        print(f"\n[study] results: {self.dir / 'results.md'}")
        print(f"[study] training curves and eval/ scalars: tensorboard --logdir {self.dir / 'tensorboard'}")
        return result


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None
