"""`ecliptica run-one STUDY_DIR JOB_ID`: the one process every launcher starts, for one run or sweep point.

It reads only files: STUDY_DIR/study.yaml and STUDY_DIR/plan.json (the calibrated settings, written by the
driver). It never opens the SQLite store: what it did goes to `result.json` in the run's directory, written
atomically (a reader sees the previous state or the new one), and the driver ingests it. The file is
written twice for a trained run, after training (`trained`) and after evaluation (`evaluated`), so a
relaunch after a kill between the two evaluates without training again.

Exit status: 0 done (or found done already), BUSY when another process holds the run's directory (it is
working on the same run), 1 on any failure (the traceback is in the log; `result.json` says `failed`).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from ..runio import DirLock, DirLockedError, atomic_write_text
from .calibration import point_config, sweep
from .config import ArmSpec, StudyConfig
from .plan import StudyPlan, load_study

RESULT_NAME = "result.json"
PLAN_NAME = "plan.json"
BUSY = 75  # EX_TEMPFAIL: try again later
FINAL = {"run": "evaluated", "point": "scored"}


@dataclass(frozen=True)
class Job:
    """One unit a launcher runs: a final run (arm x seed) or a calibration sweep point."""

    id: str
    kind: str  # "run" | "point"
    arm: ArmSpec
    seed: int | None
    point: dict | None
    run_dir: Path
    config_hash: str

    @property
    def result_path(self) -> Path:
        return self.run_dir / RESULT_NAME


def run_jobs(planning: StudyPlan) -> list[Job]:
    """The final runs, in plan order (calibration must be done)."""
    return [
        Job(planning.run_id(a, s), "run", a, s, None, planning.run_dir(a, s), planning.hash(a, s))
        for a, s in planning.plan
    ]


def point_jobs(cfg: StudyConfig) -> list[Job]:
    """The calibration sweep points, each trained and scored in its own directory."""
    jobs = []
    for arm in cfg.calibrated_arms():
        for p in sweep(cfg, arm):
            tc = point_config(cfg, arm, p)
            jobs.append(Job(p["point_id"], "point", arm, None, p, Path(tc.run_dir), tc.hash()))
    return jobs


def write_plan_file(planning: StudyPlan, jobs: list[Job]) -> None:
    """What run-one needs beyond study.yaml: each arm's calibrated settings (None while the sweep runs), and
    each job's configuration hash as the driver computed it (run-one refuses a job it would hash otherwise:
    a node with other code or data than the driver's)."""
    text = json.dumps({"calibrated": planning.calibrated, "jobs": {j.id: j.config_hash for j in jobs}}, indent=1)
    atomic_write_text(planning.dir / PLAN_NAME, text)


def read_result(job: Job) -> dict | None:
    """The job's result file if it belongs to this job's configuration, else None (a stale file from a
    changed config is not this run's result)."""
    try:
        res = json.loads(job.result_path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:  # never torn (atomic writes): a file someone else wrote
        raise ValueError(f"{job.result_path}: not a result file ({e})") from None
    return res if res.get("config_hash") == job.config_hash and res.get("job") == job.id else None


def is_final(job: Job, res: dict | None) -> bool:
    return res is not None and res.get("status") == FINAL[job.kind]


def _write(job: Job, status: str, **fields) -> dict:
    res = {
        "job": job.id,
        "kind": job.kind,
        "config_hash": job.config_hash,
        "status": status,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "written_at": time.time(),
        **fields,
    }
    job.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(job.result_path, json.dumps(res, indent=1))
    return res


def find_job(study_dir: Path) -> tuple[StudyPlan, dict[str, Job]]:
    cfg = load_study(study_dir / "study.yaml")
    plan_file = study_dir / PLAN_NAME
    if not plan_file.exists():
        raise ValueError(f"{plan_file}: missing; it is written by the study's driver (`ecliptica run`) before launch")
    written = json.loads(plan_file.read_text())
    planning = StudyPlan.detached(cfg, written["calibrated"])
    jobs = {j.id: j for j in point_jobs(cfg)}
    if written["calibrated"] is not None:
        jobs.update({j.id: j for j in run_jobs(planning)})
    for job_id, want in written["jobs"].items():
        if job_id in jobs and jobs[job_id].config_hash != want:
            raise ValueError(
                f"{plan_file}: job {job_id}: the driver hashed its configuration as {want}, this process as "
                f"{jobs[job_id].config_hash}; the driver and this node must run the same code on the same files"
            )
    return planning, jobs


def run_one(study_dir: str | Path, job_id: str) -> int:
    study_dir = Path(study_dir)
    planning, jobs = find_job(study_dir)
    if job_id not in jobs:
        raise ValueError(f"{study_dir / PLAN_NAME}: no run or sweep point {job_id!r}; known: {sorted(jobs)}")
    job = jobs[job_id]
    try:
        lock = DirLock(job.run_dir, f"run-one {job_id}").acquire()
    except DirLockedError as e:
        print(f"[run-one] {job_id}: busy: {e}", file=sys.stderr, flush=True)
        return BUSY
    try:
        res = read_result(job)
        if is_final(job, res):  # a duplicate launch (a retry racing a late success): nothing to do
            print(f"[run-one] {job_id}: already {res['status']}; nothing to do", flush=True)
            return 0
        try:
            if job.kind == "point":
                _score_point(planning, job)
            else:
                _run(planning, job, res)
        except Exception as e:
            _write(job, "failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            raise
        return 0
    finally:
        lock.release()


def _score_point(planning: StudyPlan, job: Job) -> None:
    from .calibration import score_point

    print(f"[study] calibration {job.id} ({job.arm.method}, optimizer={job.arm.optimizer})", flush=True)
    _write(job, "scored", scores=score_point(planning.cfg, point_config(planning.cfg, job.arm, job.point)))


def _run(planning: StudyPlan, job: Job, res: dict | None) -> None:
    from .execution import RunExecutor, train_run
    from .tb import write_eval_scalars

    summary = (res or {}).get("train_summary")
    splits = dict((res or {}).get("splits") or {})
    if job.arm.trained and summary is None:
        tc = planning.arm_config(job.arm, job.seed)
        print(
            f"[study] training {job.id} ({job.arm.method}, optimizer={job.arm.optimizer}, "
            f"placement={tc.method.placement or 'method default'})",
            flush=True,
        )
        summary = train_run(tc)
        splits["preference"] = summary["data"]["split"]
        _write(job, "trained", train_summary=summary, splits=splits)
    ev = RunExecutor(planning).evaluation(job.arm, job.seed, job.id)
    write_eval_scalars(
        planning.dir / "tensorboard" / job.id, ev.summaries["test"], step=(summary or {}).get("steps", 0)
    )
    _write(job, "evaluated", train_summary=summary, evaluations=ev.records, splits={**splits, **ev.splits})
