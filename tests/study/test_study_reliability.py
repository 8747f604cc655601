"""A study directory has one coordinator (two real `ecliptica run` processes), the single-process path
claims its runs in the store, and a bad `evaluation:` block fails before any arm trains."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from study_helpers import tiny_study_overrides

from ecliptica.runio import LOCK_NAME
from ecliptica.study.runner import StudyRunner, load_study

ROOT = Path(__file__).resolve().parents[2]
STUDY = str(ROOT / "configs" / "study_demo.yaml")


def _overrides(study_dir, model_dir, steps):
    """A baseline and one trained arm on the tiny model, evaluated on a few prompts."""
    return [
        f"study_dir={study_dir}",
        *tiny_study_overrides(study_dir, model_dir, steps),
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
