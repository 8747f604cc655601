"""The local worker pool: `workers` processes on this host, each claiming runs (or sweep points) in the
store, with the coordinator cleaning up after any that dies so the others never wait for it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from .calibration import register_points
from .execution import COMPILE_CACHE_VARS
from .plan import StudyPlan


class WorkerPool:
    def __init__(self, plan: StudyPlan):
        self.planning = plan
        self.cfg = plan.cfg
        self.store = plan.store
        self.dir = plan.dir
        self.given_back: dict[tuple[str, str], str] = {}  # run or sweep point -> the dead worker that held it
        self.crashed: list[dict] = []

    def run(self, workers: int, devices: list[str] | None, phase: str = "runs") -> None:
        """Start `workers` processes on this study (round-robin over `devices`, e.g. GPU ids), show
        their progress, and clean up after any that dies so the others never wait for it."""
        from tqdm.auto import tqdm

        from ..models import resolve_model_path

        resolve_model_path(self.cfg.train.get("model", {}).get("name", "smollm2-135m-instruct"))  # convert once, here
        self.store.release_all()  # claims left by a killed earlier invocation
        for r in self.store.all():
            if r["status"] == "failed":  # retried, as in the single-process path
                self.store.set_status(r["run_id"], "pending")
        for p in self.store.calibration():
            if p["status"] == "failed":
                self.store.set_point(p["point_id"], "pending")
        logs = self.dir / "logs"
        logs.mkdir(exist_ok=True)
        threads = max(1, (os.cpu_count() or 1) // workers)
        procs = {}
        for i in range(workers):
            env = dict(os.environ)
            env.setdefault("OMP_NUM_THREADS", str(threads))
            if devices:
                env["CUDA_VISIBLE_DEVICES"] = devices[i % len(devices)]
                shared = sum(1 for j in range(workers) if devices[j % len(devices)] == devices[i % len(devices)])
            else:
                shared = workers  # all on the same default device (or the same CPU cores)
            env["ECLIPTICA_DEVICE_SHARED_BY"] = str(shared)
            name = f"worker{i}"
            env.update(self.compile_caches(name))
            log = open(logs / f"{name}.log", "ab")
            cmd = [sys.executable, "-m", "ecliptica.cli", "run", str(self.dir / "study.yaml"), "--worker", name]
            procs[name] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        print(
            f"[study] {workers} workers{' on devices ' + ','.join(devices) if devices else ''}; logs in {logs}",
            flush=True,
        )
        plan = self.planning.plan
        trained_arms = {a.name for a in self.cfg.arms if a.trained}
        if phase == "calibration":
            n_work, desc = len(self.store.calibration()), "calibration sweep (train + score)"
        else:
            n_work, desc = (
                sum(1 for a, _ in plan if a.name in trained_arms) + len(plan),
                "study runs (train + eval)",
            )
        crashed = []
        with tqdm(total=n_work, desc=desc, unit="job") as bar:
            while procs:
                time.sleep(2.0)
                for name, (proc, log) in list(procs.items()):
                    if proc.poll() is None:
                        continue
                    log.close()
                    del procs[name]
                    if proc.returncode != 0:
                        crashed.append({"name": name, "returncode": proc.returncode, "log": logs / f"{name}.log"})
                        print(
                            f"[study] warning: {name} exited with status {proc.returncode} (see "
                            f"{logs / f'{name}.log'}); what it held goes back to the other workers",
                            file=sys.stderr,
                            flush=True,
                        )
                        self.abandon(name)
                if phase == "calibration":
                    done = sum(p["status"] == "scored" for p in self.store.calibration())
                else:
                    done = sum(
                        (r["status"] in ("trained", "evaluated") and r["arm"] in trained_arms)
                        + (r["status"] == "evaluated")
                        for r in self.store.all()
                    )
                bar.update(done - bar.n)
        if phase == "calibration":
            sweep_ids = {p["point_id"] for _, p, _ in register_points(self.cfg, self.store)}
            bad = [
                {"run_id": p["point_id"], "status": p["status"], "error": p["error"]}
                for p in self.store.calibration()
                if p["point_id"] in sweep_ids and p["status"] != "scored"
            ]
        else:
            bad = [r for r in self.store.all() if r["status"] != "evaluated"]
        self.crashed += crashed
        if bad:  # never empty: a crashed worker whose work the others finished is only a warning
            what = "calibration points not scored" if phase == "calibration" else "runs not evaluated"
            raise RuntimeError(
                f"study incomplete: {what}: "
                + ", ".join(f"{r['run_id']} ({r['status']}{': ' + r['error'] if r['error'] else ''})" for r in bad)
                + (f"; workers that exited abnormally: {', '.join(c['name'] for c in crashed)}" if crashed else "")
                + f" (logs in {logs}); run the same command again to retry them"
            )

    def compile_caches(self, name: str) -> dict[str, str]:
        """A worker's own torch compile caches, so that workers compiling at once never race on Inductor's and
        Triton's files. By default they live in STUDY_DIR/workers/<name>/, so a rerun of the study starts warm. A directory
        set in the environment (by the user, or by torch in this process) is kept as the parent, with a
        subdirectory per study and worker: two studies running at once never share one either."""
        study = f"{self.dir.name}-{hashlib.sha1(str(self.dir.resolve()).encode()).hexdigest()[:8]}"
        out = {}
        for var, sub in zip(COMPILE_CACHE_VARS, ("inductor", "triton")):
            parent = os.environ.get(var)
            out[var] = str(Path(parent) / study / name if parent else self.dir.resolve() / "workers" / name / sub)
        return out

    def abandon(self, worker: str) -> None:
        """A worker died. The runs and sweep points it held go back to the other workers (a training run
        resumes from its latest checkpoint), once: if a second worker dies holding the same one, it is
        marked failed (the next invocation retries it), so one run that kills whichever process works on
        it cannot take every worker down. A trained run it was evaluating only goes back (marked failed,
        it would be trained again)."""
        for r in self.store.all():
            if r["worker"] == worker:
                first = self.given_back.get(("run", r["run_id"]))
                if r["status"] in ("pending", "training"):
                    if first:
                        self.store.set_status(
                            r["run_id"], "failed", error=f"{worker} exited while working on it, as {first} had before"
                        )
                    else:
                        self.given_back[("run", r["run_id"])] = worker
                self.store.release(r["run_id"])
        for p in self.store.calibration():
            if p["worker"] == worker:
                first = self.given_back.get(("point", p["point_id"]))
                if p["status"] == "pending":
                    if first:
                        self.store.set_point(
                            p["point_id"], "failed", error=f"{worker} exited while scoring it, as {first} had before"
                        )
                    else:
                        self.given_back[("point", p["point_id"])] = worker
                self.store.release_point(p["point_id"])
