"""The driver: the one process that writes the study's SQLite store.

It launches `run-one` for every run (or sweep point) that is not done, through a launcher (launchers.py),
and ingests each result file the runs write atomically in their own directories. Why this design, and
what it guarantees, is in docs/scaling.md ("The store"):

- no run is done twice: a run that is evaluated in the store, or whose result file is final, is not
  launched (a killed driver's finished runs are ingested on the next start); ingesting is idempotent;
  run-one itself refuses a run another process holds (BUSY) or one already final;
- a run is claimed in the store by this driver before launch, so two drivers never launch the same run;
- a failed or pre-empted launch is retried, at most `max_attempts` launches per run, and every launch is
  recorded in STUDY_DIR/launches.jsonl; the attempts of this invocation are in `Driver.attempts`.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections import deque

from .plan import StudyPlan
from .runone import FINAL, Job, is_final, point_jobs, read_result, run_jobs, write_plan_file

BUSY_WAIT_S = 5.0  # before relaunching a run another process holds


class Driver:
    def __init__(self, planning: StudyPlan, launcher, max_attempts: int = 3, claimant: str | None = None):
        self.planning, self.launcher, self.max_attempts = planning, launcher, max_attempts
        self.store = planning.store
        self.claimant = claimant or f"driver-{socket.gethostname()}-{os.getpid()}"
        self.attempts: dict[str, int] = {}
        self.retried: list[dict] = []  # {job, attempts, errors}: done, but after failed launches

    # ---------------------------------------------------------------- phases
    def run(self) -> None:
        """Calibration (if unfinished), the choice, then the final runs. Raises naming every job left undone."""
        if self.planning.calibrated is None:
            self._raise_if_bad(self.execute(point_jobs(self.planning.cfg)), "calibration points not scored")
            self.planning.calibrate()  # every point is scored: this only chooses
        self._raise_if_bad(self.execute(run_jobs(self.planning)), "runs not evaluated")

    def _raise_if_bad(self, bad: list[dict], what: str) -> None:
        if bad:
            raise RuntimeError(
                f"study incomplete: {what}: "
                + ", ".join(f"{b['id']} ({b['status']}{': ' + b['error'] if b.get('error') else ''})" for b in bad)
                + f" (logs in {self.planning.dir / 'logs'}); run the same command again to retry them"
            )

    # ---------------------------------------------------------------- one phase
    def execute(self, jobs: list[Job]) -> list[dict]:
        """Launch every job not done, ingest results as they come, retry failures. Returns the jobs left undone."""
        from tqdm.auto import tqdm

        write_plan_file(self.planning, jobs)
        queue: deque[Job] = deque()
        held: list[dict] = []
        for job in jobs:
            if self._done_in_store(job):
                continue
            res = read_result(job)
            if is_final(job, res):  # finished while no driver was watching (a killed driver)
                self.ingest(job, res)
                continue
            if not self._claim(job):
                held.append({"id": job.id, "status": "held", "error": f"claimed by {self._holder(job)}"})
                continue
            queue.append(job)
        by_id = {j.id: j for j in queue}
        failed: list[dict] = []
        capacity = self.launcher.capacity
        running: set[str] = set()
        try:
            with tqdm(total=len(queue), desc=f"study jobs ({self.launcher.name})", unit="job") as bar:
                while queue or running:
                    room = len(queue) if capacity is None else min(len(queue), capacity - len(running))
                    batch = [queue.popleft() for _ in range(max(0, room))]
                    if batch:
                        for job in batch:
                            self.attempts[job.id] = self.attempts.get(job.id, 0) + 1
                            self._set_training(job)
                        self.launcher.submit([j.id for j in batch])
                        running.update(j.id for j in batch)
                    for job_id, outcome in self.launcher.finished(timeout=2.0):
                        running.discard(job_id)
                        job = by_id[job_id]
                        res = read_result(job)
                        self._log(job, outcome, res)
                        if res is not None and res.get("status") != "failed":
                            self.ingest(job, res)  # a trained run's training counts even if its evaluation died
                        if is_final(job, res):
                            bar.update(1)
                            if self.attempts[job_id] > 1:
                                self.retried.append({"job": job_id, "attempts": self.attempts[job_id]})
                            continue
                        error = (res or {}).get("error") or outcome.detail
                        if outcome.busy:
                            self.attempts[job_id] -= 1  # someone else is on it: not an attempt of ours
                            time.sleep(BUSY_WAIT_S)
                            queue.append(job)
                        elif self.attempts[job_id] < self.max_attempts:
                            print(
                                f"[study] {job_id}: attempt {self.attempts[job_id]} of {self.max_attempts} failed "
                                f"({error}); launching it again",
                                file=sys.stderr,
                                flush=True,
                            )
                            queue.append(job)
                        else:
                            error = f"{self.attempts[job_id]} launches failed, the last: {error}"
                            self._set_failed(job, error)
                            failed.append({"id": job_id, "status": "failed", "error": error})
                            bar.update(1)
        finally:
            self.launcher.close()
            for job in by_id.values():
                self._release(job)
        return held + failed

    # ---------------------------------------------------------------- the store (this process only)
    def _done_in_store(self, job: Job) -> bool:
        row = self.store.get(job.id) if job.kind == "run" else self.store.point(job.id)
        return row is not None and row["status"] == FINAL[job.kind]

    def ingest(self, job: Job, res: dict) -> None:
        """Copy a result file into the store; a no-op for what the store already has."""
        store = self.store
        if job.kind == "point":
            if store.point(job.id)["status"] != "scored" and res["status"] == "scored":
                store.record_split("preference", res["scores"]["split"])
                store.set_point(job.id, "scored", scores=res["scores"])
            return
        status = store.get(job.id)["status"]
        if status == "evaluated":
            return
        splits = res.get("splits") or {}
        if res.get("train_summary") is not None and status != "trained":
            store.record_split("preference", splits["preference"])
            store.set_status(job.id, "trained", train_summary=res["train_summary"])
        if res["status"] == "evaluated":
            for split, record in res["evaluations"].items():
                store.record_split(f"eval:{split}", splits[f"eval:{split}"])
                store.set_evaluation(job.id, split, record)
            store.set_status(job.id, "evaluated", eval_result=res["evaluations"]["test"])

    def _set_training(self, job: Job) -> None:
        if job.kind == "run" and self.store.get(job.id)["status"] in ("pending", "failed"):
            self.store.set_status(job.id, "training" if job.arm.trained else "pending")
        elif job.kind == "point" and self.store.point(job.id)["status"] == "failed":
            self.store.set_point(job.id, "pending")

    def _set_failed(self, job: Job, error: str) -> None:
        if job.kind == "run":
            self.store.set_status(job.id, "failed", error=error)
        else:
            self.store.set_point(job.id, "failed", error=error)

    def _claim(self, job: Job) -> bool:
        if job.kind == "run":
            return self.store.claim(job.id, self.claimant)
        return self.store.claim_point(job.id, self.claimant)

    def _holder(self, job: Job) -> str:
        return (self.store.get(job.id) if job.kind == "run" else self.store.point(job.id))["worker"]

    def _release(self, job: Job) -> None:
        if job.kind == "run":
            self.store.release(job.id)
        else:
            self.store.release_point(job.id)

    def _log(self, job: Job, outcome, res: dict | None) -> None:
        entry = {
            "job": job.id,
            "attempt": self.attempts[job.id],
            "launcher": self.launcher.name,
            "ok": outcome.ok,
            "busy": outcome.busy,
            "detail": outcome.detail,
            "result": (res or {}).get("status"),
            "devices": (res or {}).get("devices"),
            "host": (res or {}).get("host"),
            "driver": self.claimant,
            "time": time.time(),
        }
        with open(self.planning.dir / "launches.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
