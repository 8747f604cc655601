"""Launchers: where each `ecliptica run-one STUDY_DIR JOB_ID` process runs. Every launcher starts exactly that
command (`RUN_ONE`, or the prefix given, e.g. to run it in a container); the driver (driver.py) decides what
to launch, ingests the results and retries failures, so a launcher only starts processes and says how each
ended: `Outcome(ok, busy, detail)`.

- local: a pool of processes on this host, `workers` at a time, round-robin over `devices`;
- submitit: each run a SLURM job; the runs of one submission form one job array;
- ray: each run a Ray task reserving `num_gpus`, on an existing cluster or a local one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .launch_config import LauncherSection, RaySettings, SubmititSettings
from .runone import BUSY

RUN_ONE = (sys.executable, "-m", "ecliptica.cli", "run-one")


@dataclass
class Outcome:
    ok: bool  # the process exited 0 (the driver still checks the result file)
    busy: bool = False  # another process holds the run: launch again later, not counted as an attempt
    detail: str = ""  # exit status, exception, log file


def run_one_process(command: Sequence[str], study_dir: str, job_id: str, log: str | None = None) -> int:
    """The body of a SLURM job or Ray task: run-one as a child process (a crash in it cannot take the
    launcher's own process down, and every launcher runs the same command). Returns its exit status."""
    cmd = [*command, study_dir, job_id]
    if log is None:
        return subprocess.run(cmd).returncode
    with open(log, "ab") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode


def _outcome(rc: int, log: str) -> Outcome:
    return Outcome(rc == 0, busy=rc == BUSY, detail=f"exit status {rc} (log {log})")


class LocalLauncher:
    """`workers` run-one processes at a time on this host; each slot keeps its device and compile caches."""

    name = "local"

    def __init__(self, study_dir: Path, workers: int = 1, devices: list[str] | None = None, command=RUN_ONE):
        self.dir, self.workers, self.devices, self.command = Path(study_dir), max(1, workers), devices, command
        self.capacity = self.workers
        self.free = list(range(self.workers))
        self.procs: dict[str, tuple[subprocess.Popen, int, object, str]] = {}

    def slot_env(self, slot: int) -> dict[str, str]:
        from .pool import compile_caches

        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.workers)))
        if self.devices:
            device = self.devices[slot % len(self.devices)]
            env["CUDA_VISIBLE_DEVICES"] = device
            shared = sum(1 for j in range(self.workers) if self.devices[j % len(self.devices)] == device)
        else:
            shared = self.workers  # all on the same default device (or the same CPU cores)
        env["ECLIPTICA_DEVICE_SHARED_BY"] = str(shared)
        env.update(compile_caches(self.dir, f"worker{slot}"))
        return env

    def submit(self, job_ids: list[str]) -> None:
        logs = self.dir / "logs"
        logs.mkdir(exist_ok=True)
        for job_id in job_ids:
            slot = self.free.pop(0)
            log_path = str(logs / f"{job_id}.log")
            log = open(log_path, "ab")
            proc = subprocess.Popen(
                [*self.command, str(self.dir), job_id], env=self.slot_env(slot), stdout=log, stderr=subprocess.STDOUT
            )
            self.procs[job_id] = (proc, slot, log, log_path)

    def finished(self, timeout: float) -> list[tuple[str, Outcome]]:
        deadline = time.time() + timeout
        while True:
            done = []
            for job_id, (proc, slot, log, log_path) in list(self.procs.items()):
                if proc.poll() is not None:
                    log.close()
                    del self.procs[job_id]
                    self.free.append(slot)
                    done.append((job_id, _outcome(proc.returncode, log_path)))
            if done or time.time() >= deadline:
                return done
            time.sleep(0.2)

    def close(self) -> None:
        for proc, _, log, _ in self.procs.values():  # a driver stopped early: its children stop too
            proc.kill()
            proc.wait()
            log.close()


class SubmititLauncher:
    """Each run one SLURM job (submitit); one submission is one job array, at most `array_parallelism` at once."""

    name = "submitit"

    def __init__(self, study_dir: Path, settings: SubmititSettings, command=RUN_ONE):
        import submitit

        self.dir, self.settings, self.command = Path(study_dir), settings, command
        folder = Path(settings.folder) if settings.folder else self.dir / "slurm"
        self.executor = submitit.AutoExecutor(folder=folder / "%j", cluster=settings.cluster)
        params = {
            "timeout_min": settings.time_min,
            "gpus_per_node": settings.gpus_per_run,
            "cpus_per_task": settings.cpus_per_run,
            "tasks_per_node": 1,
            "nodes": 1,
            "name": f"ecliptica-{self.dir.name}",
        }
        if self.executor.cluster == "slurm":
            params["slurm_array_parallelism"] = settings.array_parallelism
            if settings.partition:
                params["slurm_partition"] = settings.partition
        if settings.mem_gb:
            params["mem_gb"] = settings.mem_gb
        self.executor.update_parameters(**params, **settings.additional)
        self.capacity = None  # the scheduler queues them
        self.jobs: dict[str, object] = {}

    def submit(self, job_ids: list[str]) -> None:
        logs = self.dir / "logs"
        logs.mkdir(exist_ok=True)
        cmd, d = list(self.command), str(self.dir)
        args = [(cmd, d, j, str(logs / f"{j}.log")) for j in job_ids]
        # one job array per submission (map_array), so a sweep of 100 runs is one sbatch
        jobs = self.executor.map_array(run_one_process, *zip(*args)) if len(args) > 1 else None
        if jobs is None:
            jobs = [self.executor.submit(run_one_process, *args[0])]
        for job_id, job in zip(job_ids, jobs):
            print(f"[study] {job_id}: {self.executor.cluster} job {job.job_id}", flush=True)
            self.jobs[job_id] = job

    def finished(self, timeout: float) -> list[tuple[str, Outcome]]:
        deadline = time.time() + timeout
        while True:
            done = []
            for job_id, job in list(self.jobs.items()):
                if not job.done():
                    continue
                del self.jobs[job_id]
                log = str(self.dir / "logs" / f"{job_id}.log")
                try:
                    done.append((job_id, _outcome(job.result(), log)))
                except Exception as e:  # pre-empted, timed out, node failure: submitit says which
                    done.append((job_id, Outcome(False, detail=f"job {job.job_id}: {type(e).__name__}: {e}"[:500])))
            if done or time.time() >= deadline:
                return done
            time.sleep(1.0)

    def close(self) -> None:
        for job in self.jobs.values():
            job.cancel(check=False)


class RayLauncher:
    """Each run one Ray task with `num_gpus` (Ray gives it its own CUDA_VISIBLE_DEVICES)."""

    name = "ray"

    def __init__(self, study_dir: Path, settings: RaySettings, command=RUN_ONE, init_kwargs: dict | None = None):
        try:
            import ray
        except ImportError:
            raise RuntimeError(
                "launcher ray: Ray is not installed; install the optional extra: pip install 'ecliptica[ray]'"
            ) from None
        self.ray, self.dir, self.settings, self.command = ray, Path(study_dir), settings, command
        if not ray.is_initialized():
            ray.init(address=settings.address, **(init_kwargs or {}))
        self.task = ray.remote(run_one_process).options(
            num_gpus=settings.num_gpus, num_cpus=settings.num_cpus, max_retries=0
        )  # retries are the driver's, counted and recorded like every launcher's
        self.capacity = None
        self.refs: dict[object, str] = {}

    def submit(self, job_ids: list[str]) -> None:
        logs = self.dir / "logs"
        logs.mkdir(exist_ok=True)
        for j in job_ids:
            self.refs[self.task.remote(list(self.command), str(self.dir), j, str(logs / f"{j}.log"))] = j

    def finished(self, timeout: float) -> list[tuple[str, Outcome]]:
        if not self.refs:
            return []
        ready, _ = self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=timeout)
        done = []
        for ref in ready:
            job_id = self.refs.pop(ref)
            log = str(self.dir / "logs" / f"{job_id}.log")
            try:
                done.append((job_id, _outcome(self.ray.get(ref), log)))
            except Exception as e:  # the task's worker died (killed, OOM, node lost)
                done.append((job_id, Outcome(False, detail=f"{type(e).__name__}: {str(e)[:300]}")))
        return done

    def close(self) -> None:
        for ref in self.refs:
            self.ray.cancel(ref, force=True)


def make_launcher(study_dir: Path, section: LauncherSection, workers: int = 1, devices: list[str] | None = None):
    if section.name == "submitit":
        return SubmititLauncher(study_dir, section.submitit)
    if section.name == "ray":
        return RayLauncher(study_dir, section.ray)
    return LocalLauncher(study_dir, workers, devices)
