"""A study directory has one coordinator (two real `ecliptica run` processes), the single-process path
claims its runs in the store, and a bad `evaluation:` block fails before any arm trains."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ecliptica.runio import LOCK_NAME
from ecliptica.study.runner import StudyRunner, load_study
from ecliptica.study.store import StudyStore

ROOT = Path(__file__).resolve().parents[2]
STUDY = str(ROOT / "configs" / "study_demo.yaml")


def _overrides(study_dir, model_dir, steps):
    """A baseline and one trained arm on the tiny model, evaluated on a few prompts."""
    return [
        f"study_dir={study_dir}",
        f"train.model.name={model_dir}",
        f"train.train.max_steps={steps}",
        "train.train.progress=false",
        "train.data.limit=16",
        "evaluation.data.limit=48",
        "evaluation.behaviour.limit=8",
        "evaluation.behaviour.max_new_tokens=4",
        "evaluation.drift.limit=4",
        f"evaluation.cache_dir={study_dir}/cache",
        "evaluation.progress=false",
        "arms=[{name: baseline, method: baseline}, {name: sft, method: sft}]",
    ]


def test_second_study_process_on_one_study_dir_is_refused(tmp_path, tiny_model_dir):
    study_dir = tmp_path / "study"
    cmd = [sys.executable, "-m", "ecliptica.cli", "run", STUDY]
    for a in _overrides(study_dir, tiny_model_dir, steps=100000):
        cmd += ["--set", a]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = study_dir / "runs" / "sft-s0" / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while not metrics.exists() and time.time() < deadline:  # the first one is training sft-s0
            assert first.poll() is None, "the first study ended early"
            time.sleep(0.2)
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)  # refused at once
        assert first.poll() is None
        assert json.loads((study_dir / LOCK_NAME).read_text())["pid"] == first.pid
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert second.returncode == 2
    assert f"{study_dir} is in use by process {first.pid}" in second.stderr
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if x.endswith("}")]
    assert steps == list(range(1, len(steps) + 1))  # only one process trained it


def test_single_process_study_claims_each_run_while_working_on_it(tmp_path, tiny_model_dir, monkeypatch):
    from ecliptica.train import Trainer

    runner = StudyRunner(load_study(STUDY, _overrides(tmp_path / "s", tiny_model_dir, steps=1)))
    seen = []
    real = Trainer.train

    def train(self, *a, **k):
        seen.append(runner.store.get("sft-s0")["worker"])
        return real(self, *a, **k)

    monkeypatch.setattr(Trainer, "train", train)
    runner.train_all()
    assert seen == [f"main-{os.getpid()}"]
    row = runner.store.get("sft-s0")
    assert row["status"] == "trained" and row["worker"] is None  # released when done
    runner.store.claim("sft-s0", "worker9")  # held elsewhere: not touched
    runner.store.set_status("sft-s0", "pending")
    runner.train_all()
    assert seen == [f"main-{os.getpid()}"]


# run as a worker by the fake Popen below: its first training run (or sweep point) kills it at once, like a
# segfault or an OOM kill (no cleanup: its claim stays in the store), after it leaves a marker file; once
CRASHING_WORKER = """
import os, pathlib, sys
from ecliptica.train import Trainer

real = Trainer.train

def crash(self, *args, **kwargs):
    marker = pathlib.Path({marker!r})
    if marker.exists():  # a later process of this worker trains as usual
        return real(self, *args, **kwargs)
    marker.write_text(str(self.run_dir))
    os._exit(1)

Trainer.train = crash
from ecliptica.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _study_with_crashing_workers(tmp_path, model_dir, monkeypatch, capsys, crashing, extra=()):
    """`ecliptica run --workers 2` on the tiny study, with the workers in `crashing` dying once in their first
    training; worker1 starts only when worker0 has died, so worker0 is the one that claims the first run.
    Returns (exit status, stderr, {worker: log}, study_dir); the coordinator runs here, the workers as processes."""
    from ecliptica.cli import main

    study_dir = tmp_path / "study"
    markers = {w: tmp_path / f"{w}.crashed" for w in crashing}
    real_popen = subprocess.Popen

    def popen(cmd, **kwargs):
        if isinstance(cmd, list) and "--worker" in cmd:
            name = cmd[cmd.index("--worker") + 1]
            deadline = time.time() + 300
            while name != "worker0" and not markers["worker0"].exists():
                assert time.time() < deadline, "worker0 never crashed"
                time.sleep(0.2)
            if name in markers:  # [python, -m, ecliptica.cli, run, ...] -> [python, -c, CODE, run, ...]
                cmd = [cmd[0], "-c", CRASHING_WORKER.format(marker=str(markers[name])), *cmd[3:]]
        return real_popen(cmd, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src"))  # the workers run this tree
    args = ["run", STUDY, "--workers", "2"]
    for a in [*_overrides(study_dir, model_dir, steps=2), *extra]:
        args += ["--set", a]
    status = main(args)
    logs = {w: (study_dir / "logs" / f"{w}.log").read_text() for w in ("worker0", "worker1")}
    for w in crashing:
        assert markers[w].exists(), f"{w} never crashed"
    return status, capsys.readouterr().err, logs, study_dir


def _assert_complete_with_warning(status, err, logs, study_dir):
    """Exit status 3, a warning naming worker0 and its log, every run trained and evaluated once, the report."""
    assert status == 3
    assert f"warning: worker0 exited with status 1 (see {study_dir / 'logs' / 'worker0.log'})" in err
    assert "worker1 exited" not in err and "study incomplete" not in err
    rows = {r["run_id"]: r for r in StudyStore(study_dir / "study.sqlite").all()}
    assert set(rows) == {"baseline-s0", "sft-s0"}
    for rid, row in rows.items():
        assert row["status"] == "evaluated" and row["worker"] is None
        assert "".join(logs.values()).count(f"[study] evaluating {rid}\n") == 1
    assert rows["sft-s0"]["train_summary"]["steps"] == 2
    steps = [json.loads(x)["step"] for x in (study_dir / "runs" / "sft-s0" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # trained once: every step logged once
    for f in ("results.md", "results.csv", "results.json"):
        assert (study_dir / f).exists()


def test_worker_that_crashes_on_a_run_another_redoes_is_a_warning(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # the user's: a parent per worker
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    status, err, logs, study_dir = _study_with_crashing_workers(
        tmp_path, tiny_model_dir, monkeypatch, capsys, ("worker0",)
    )
    assert (tmp_path / "worker0.crashed").read_text() == str(study_dir / "runs" / "sft-s0")
    _assert_complete_with_warning(status, err, logs, study_dir)
    assert logs["worker1"].count("[study] training sft-s0 ") == 1  # redone by worker1
    for w, log in logs.items():  # each worker had compile caches of its own, in a subdirectory of the user's
        inductor = re.search(rf"TORCHINDUCTOR_CACHE_DIR={tmp_path / 'inductor'}/study-[0-9a-f]{{8}}/{w} ", log)
        assert inductor, log
        assert f" TRITON_CACHE_DIR={study_dir.resolve() / 'workers' / w / 'triton'}\n" in log


def test_worker_that_crashes_on_a_sweep_point_another_redoes_is_a_warning(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    # what one H100 study with 9 workers hit: two crashed on their first GRIT sweep point, the others scored
    # every point, and the study stopped on an empty list of unfinished runs
    sweep = ["calibration.arms=[sft]", "calibration.lrs=[1.0e-4, 5.0e-2]", "train.data.val_fraction=0.3"]
    status, err, logs, study_dir = _study_with_crashing_workers(
        tmp_path, tiny_model_dir, monkeypatch, capsys, ("worker0",), sweep
    )
    assert (tmp_path / "worker0.crashed").read_text() == str(study_dir / "calibration" / "sft-lr0.0001")
    _assert_complete_with_warning(status, err, logs, study_dir)
    points = StudyStore(study_dir / "study.sqlite").calibration()
    assert [(p["point_id"], p["status"]) for p in points] == [("sft-lr0.0001", "scored"), ("sft-lr0.05", "scored")]
    assert sum(p["chosen"] for p in points) == 1
    assert logs["worker1"].count("[study] calibration sft-lr0.0001 (") == 1  # redone by worker1
    assert "".join(logs.values()).count("[study] calibration sft-lr0.05 (") == 1


def test_run_that_kills_two_workers_is_failed_and_listed(tmp_path, tiny_model_dir, monkeypatch, capsys):
    status, err, logs, study_dir = _study_with_crashing_workers(
        tmp_path, tiny_model_dir, monkeypatch, capsys, ("worker0", "worker1")
    )
    assert status == 2
    assert StudyStore(study_dir / "study.sqlite").get("sft-s0")["status"] == "failed"
    # the baseline is listed too, unless worker1 evaluated it before it took sft-s0
    assert "error: study incomplete: runs not evaluated: " in err
    assert "sft-s0 (failed: worker1 exited while working on it, as worker0 had before)" in err
    assert "workers that exited abnormally: worker0, worker1" in err
    assert not (study_dir / "results.md").exists()


@pytest.mark.parametrize(
    "override, key", [("evaluation.nonsense=1", "nonsense"), ("evaluation.metrics.n_resamples=lots", "n_resamples")]
)
def test_bad_evaluation_block_fails_when_the_study_loads(tmp_path, override, key):
    with pytest.raises(ValueError, match=rf"(?s)invalid.*configuration.*evaluation.*{key}"):
        load_study(STUDY, [f"study_dir={tmp_path}", override])


@pytest.mark.parametrize("bad", ["../../../tmp/x", "/tmp/x", "a/b", "a\\b", "C:\\runs", ".", "..", "", "a\x00b"])
def test_arm_name_that_is_not_one_plain_path_component_is_refused(tmp_path, bad):
    arms = [
        {"name": "baseline", "method": "baseline"},
        {"name": "sft", "method": "sft"},
        {"name": bad, "method": "dpo"},
    ]
    with pytest.raises(ValueError, match=r"arms\[2\]\.name: .*becomes a directory name"):
        load_study(STUDY, [f"study_dir={tmp_path / 'study'}", f"arms={json.dumps(arms)}"])
    assert not (tmp_path / "study").exists()


def test_evaluation_set_name_that_is_not_one_plain_path_component_is_refused(tmp_path):
    sets = {"test": {"path": "demo:eval"}, "../dev": {"path": "demo:eval"}}
    with pytest.raises(ValueError, match=r"evaluation_sets .*'\.\./dev' contains a path separator"):
        load_study(STUDY, [f"study_dir={tmp_path}", f"evaluation_sets={json.dumps(sets)}"])
    # plain names, dots and non-ASCII letters included, are single entries of the study directory
    arms = [{"name": "baseline", "method": "baseline"}, {"name": "dpo.v2-α", "method": "dpo"}]
    sets = {"test": {"path": "demo:eval"}, "dev.1": {"path": "demo:eval"}}
    cfg = load_study(
        STUDY,
        [
            f"study_dir={tmp_path}",
            f"arms={json.dumps(arms)}",
            "calibration.arms=null",
            "evaluation.data={}",
            f"evaluation_sets={json.dumps(sets)}",
        ],
    )
    assert Path(cfg.arm_config(cfg.arms[1], 3).run_dir) == tmp_path / "runs" / "dpo.v2-α-s3"
