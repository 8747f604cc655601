"""Launchers and the driver: every run done once, failures retried (bounded, recorded), a killed driver resumes,
two drivers never double-claim, Ray gives each run its own device, and a real study through submitit."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
from study_helpers import tiny_study_overrides

from ecliptica.study.driver import Driver
from ecliptica.study.launch_config import RaySettings, SubmititSettings
from ecliptica.study.launchers import LocalLauncher, Outcome, RayLauncher, SubmititLauncher
from ecliptica.study.plan import StudyPlan, load_study
from ecliptica.study.runone import run_jobs
from ecliptica.study.store import StudyStore

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "configs" / "study_demo.yaml"
ARMS = "[{name: baseline, method: baseline}, {name: sft, method: sft}, {name: dpo, method: dpo}, {name: cita, method: cita}]"
RUNS = {"baseline-s0", "sft-s0", "dpo-s0", "cita-s0"}

# A stand-in for `ecliptica run-one STUDY_DIR JOB_ID` that costs no model: it writes the final result file the
# real one writes (hash from the driver's plan.json), records its CUDA_VISIBLE_DEVICES, and, for the job named
# in FAKE_CRASH, dies on its first launch: FAKE_CRASH_HOW=exit (exit status 1) or kill_parent (kills the
# process that started it: a Ray worker lost mid-task).
FAKE = r"""
import json, os, signal, sys, time
from pathlib import Path
study, job = Path(sys.argv[1]), sys.argv[2]
marker = study / f"crashed-{job}"
if os.environ.get("FAKE_CRASH") in (job, "*") and (not marker.exists() or os.environ.get("FAKE_CRASH_ALWAYS")):
    marker.write_text("1")
    if os.environ.get("FAKE_CRASH_HOW") == "kill_parent":
        os.kill(os.getppid(), signal.SIGKILL)
    sys.exit(1)
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
h = json.loads((study / "plan.json").read_text())["jobs"][job]
run_dir = study / "runs" / job
run_dir.mkdir(parents=True, exist_ok=True)
trained = not job.startswith("baseline")
res = {"job": job, "kind": "run", "config_hash": h, "status": "evaluated",
       "devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "started": time.time(),
       "train_summary": {"steps": 1} if trained else None,
       "splits": {"preference": {"n": 16}, "eval:test": {"n_prompts": 48}},
       "evaluations": {"test": {"summary": {"job": job}}}}
(run_dir / ".tmp").write_text(json.dumps(res))
os.replace(run_dir / ".tmp", run_dir / "result.json")
"""
FAKE_CMD = (sys.executable, "-c", FAKE)


def _plan(study_dir, model_dir="unused", steps=1, extra=()):
    overrides = [
        f"study_dir={study_dir}",
        *tiny_study_overrides(study_dir, model_dir, steps),
        "calibration.enabled=false",
        f"arms={ARMS}",
        *extra,
    ]
    return StudyPlan(load_study(STUDY, overrides))


def _launches(study_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(study_dir) / "launches.jsonl").read_text().splitlines()]


def test_local_launcher_runs_each_once_and_retries_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_CRASH", "sft-s0")
    plan = _plan(tmp_path / "s")
    driver = Driver(plan, LocalLauncher(plan.dir, workers=2, devices=["0", "1"], command=FAKE_CMD), max_attempts=2)
    assert driver.execute(run_jobs(plan)) == []
    rows = {r["run_id"]: r for r in plan.store.all()}
    assert set(rows) == RUNS and {r["status"] for r in rows.values()} == {"evaluated"}
    assert all(r["worker"] is None for r in rows.values())  # claims released
    assert rows["sft-s0"]["eval_result"] == {"summary": {"job": "sft-s0"}}
    launches = _launches(plan.dir)
    assert sorted((x["job"], x["attempt"]) for x in launches) == sorted([(r, 1) for r in RUNS] + [("sft-s0", 2)])
    assert {x["devices"] for x in launches if x["result"] == "evaluated"} <= {"0", "1"}
    assert driver.retried == [{"job": "sft-s0", "attempts": 2}]


def test_run_out_of_attempts_is_failed_and_named(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_CRASH", "dpo-s0")
    monkeypatch.setenv("FAKE_CRASH_ALWAYS", "1")
    plan = _plan(tmp_path / "s")
    bad = Driver(plan, LocalLauncher(plan.dir, workers=2, command=FAKE_CMD), max_attempts=3).execute(run_jobs(plan))
    assert [b["id"] for b in bad] == ["dpo-s0"] and bad[0]["error"].startswith("3 launches failed, the last: exit")
    row = plan.store.get("dpo-s0")
    assert row["status"] == "failed" and row["error"] == bad[0]["error"]
    assert [x["attempt"] for x in _launches(plan.dir) if x["job"] == "dpo-s0"] == [1, 2, 3]
    assert {r["status"] for r in plan.store.all() if r["run_id"] != "dpo-s0"} == {"evaluated"}


class _Refuse:
    name, capacity = "refuse", None

    def submit(self, ids):
        raise AssertionError(f"launched {ids}, but every run had a final result")

    def finished(self, timeout):
        return []

    def close(self):
        pass


def test_killed_driver_resumes_by_ingesting_finished_results(tmp_path):
    plan = _plan(tmp_path / "s")
    Driver(plan, LocalLauncher(plan.dir, workers=2, command=FAKE_CMD)).execute(run_jobs(plan))
    (plan.dir / "study.sqlite").unlink()  # the driver died before ingesting anything: a store that knows nothing
    plan = _plan(tmp_path / "s")
    assert {r["status"] for r in plan.store.all()} == {"pending"}
    assert Driver(plan, _Refuse()).execute(run_jobs(plan)) == []
    assert {r["status"] for r in plan.store.all()} == {"evaluated"}
    assert plan.store.get("sft-s0")["train_summary"] == {"steps": 1}


class _InProcess:
    """Finishes every job at once, writing its result the way run-one does; counts launches."""

    name, capacity = "in-process", None

    def __init__(self, plan, launched):
        self.plan, self.launched, self.pending = plan, launched, []
        self.jobs = {j.id: j for j in run_jobs(plan)}

    def submit(self, ids):
        from ecliptica.study.runone import _write

        for i in ids:
            self.launched.append(i)
            _write(self.jobs[i], "evaluated", train_summary=None, splits={"eval:test": {}}, evaluations={"test": {}})
        self.pending += ids

    def finished(self, timeout):
        done, self.pending = [(i, Outcome(True)) for i in self.pending], []
        return done

    def close(self):
        pass


def test_two_drivers_cannot_double_claim_a_run(tmp_path, monkeypatch):
    import ecliptica.study.driver as driver_module

    # two drivers are two processes; as two threads of one they would share the temp name of plan.json's write
    lock, write = threading.Lock(), driver_module.write_plan_file

    def locked_write(*a):
        with lock:
            write(*a)

    monkeypatch.setattr(driver_module, "write_plan_file", locked_write)
    first = _plan(tmp_path / "s")
    second = StudyPlan(first.cfg)  # a second driver: its own store connection, its own claimant
    launched: list[str] = []
    drivers = [Driver(p, _InProcess(p, launched), claimant=f"driver{k}") for k, p in enumerate((first, second))]
    barrier = threading.Barrier(2)
    left = {}

    def go(k):
        barrier.wait()
        left[k] = drivers[k].execute(run_jobs(drivers[k].planning))

    threads = [threading.Thread(target=go, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(launched) == sorted(RUNS)  # each run launched once, by one of the two
    assert {r["status"] for r in StudyStore(first.dir / "study.sqlite").all()} == {"evaluated"}
    held = [b for k in left for b in left[k]]
    assert all(b["status"] == "held" and "driver" in b["error"] for b in held)


def test_ray_gives_each_run_its_own_device_and_retries_a_killed_task(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setenv(
        "RAY_enable_metrics_collection", "0"
    )  # on a loaded 2-core machine the raylet timed out waiting for its metrics agent
    monkeypatch.setenv("FAKE_CRASH", "cita-s0")
    monkeypatch.setenv("FAKE_CRASH_HOW", "kill_parent")
    monkeypatch.setenv("FAKE_SLEEP", "3")  # the four runs overlap: four logical GPUs at once
    plan = _plan(tmp_path / "s")
    settings = RaySettings(num_gpus=1, num_cpus=0)
    launcher = RayLauncher(
        plan.dir, settings, command=FAKE_CMD, init_kwargs={"num_cpus": 2, "num_gpus": 4, "include_dashboard": False}
    )
    try:
        driver = Driver(plan, launcher, max_attempts=2)
        assert driver.execute(run_jobs(plan)) == []
    finally:
        ray.shutdown()
    assert {r["status"] for r in plan.store.all()} == {"evaluated"}
    launches = _launches(plan.dir)
    crashed = [x for x in launches if x["job"] == "cita-s0" and x["attempt"] == 1]
    assert crashed and not crashed[0]["ok"] and crashed[0]["result"] is None  # the task's worker died
    assert driver.retried == [{"job": "cita-s0", "attempts": 2}]
    results = {r: json.loads((plan.dir / "runs" / r / "result.json").read_text()) for r in RUNS}
    devices = [res["devices"] for res in results.values()]
    assert all(d is not None and len(d.split(",")) == 1 for d in devices)  # one GPU each
    first_wave = [results[r]["devices"] for r in RUNS - {"cita-s0"}]  # launched together, running together
    assert len(set(first_wave)) == 3


def test_submitit_runs_a_real_tiny_study_once_and_reports(tmp_path, tiny_model_dir, monkeypatch):
    """The real path: four `ecliptica run-one` processes (one per run) started by submitit's debug executor."""
    from ecliptica.study.runner import StudyRunner

    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src"))
    plan = _plan(tmp_path / "s", tiny_model_dir)
    runner = StudyRunner(plan.cfg)
    runner.run(launcher=SubmititLauncher(plan.dir, SubmititSettings(cluster="debug")))
    rows = {r["run_id"]: r for r in plan.store.all()}
    assert set(rows) == RUNS and {r["status"] for r in rows.values()} == {"evaluated"}
    for rid in RUNS:
        log = (plan.dir / "logs" / f"{rid}.log").read_text()
        assert log.count(f"[study] evaluating {rid}\n") == 1
        assert log.count(f"[study] training {rid} ") == (rid != "baseline-s0")
        assert (
            rows[rid]["eval_result"]
            == json.loads((plan.dir / "runs" / rid / "result.json").read_text())["evaluations"]["test"]
        )
    assert rows["sft-s0"]["train_summary"]["steps"] == 1
    assert sorted(x["job"] for x in _launches(plan.dir)) == sorted(RUNS)  # launched once each
    for f in ("results.md", "results.csv", "results.json"):
        assert (plan.dir / f).exists()
    assert "Not evaluated yet" not in (plan.dir / "results.md").read_text()


def test_local_slots_get_their_own_device_and_compile_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # the user's: a parent per slot
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    study = tmp_path / "study"
    launcher = LocalLauncher(study, workers=3, devices=["0", "1"])
    envs = [launcher.slot_env(k) for k in range(3)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "0"]
    assert [e["ECLIPTICA_DEVICE_SHARED_BY"] for e in envs] == ["2", "1", "2"]  # slots 0 and 2 share GPU 0
    assert envs[1]["TRITON_CACHE_DIR"] == str(study.resolve() / "workers" / "worker1" / "triton")
    parent = Path(envs[1]["TORCHINDUCTOR_CACHE_DIR"]).parent
    assert parent.parent == tmp_path / "inductor" and parent.name.startswith("study-")
    assert len({e["TORCHINDUCTOR_CACHE_DIR"] for e in envs}) == 3
