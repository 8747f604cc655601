"""The study runner end to end on a tiny model: interruption safety, skipping finished runs, notebooks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from study_helpers import tiny_study_overrides

from ecliptica.study.runner import StudyRunner, load_study
from ecliptica.study.store import StudyStore

ROOT = Path(__file__).resolve().parents[2]
ARMS = (
    "[{name: baseline, method: baseline}, {name: sft, method: sft}, "
    "{name: dpo_grit, method: dpo, optimizer: grit}, {name: cita, method: cita}]"
)


def _overrides(study_dir, model_dir, steps=3, arms=ARMS):
    return [
        f"study_dir={study_dir}",
        *tiny_study_overrides(study_dir, model_dir, steps),
        "train.train.save_every=1",
        *([f"arms={arms}"] if arms else []),
    ]


def test_killed_study_resumes_and_skips_finished_runs(tmp_path, tiny_model_dir):
    study_dir = tmp_path / "study"
    args = _overrides(study_dir, tiny_model_dir)
    cmd = [sys.executable, "-m", "ecliptica.cli", "run", str(ROOT / "configs" / "study_demo.yaml")]
    for a in args:
        cmd += ["--set", a]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = study_dir / "runs" / "dpo_grit-s0" / "checkpoints" / "step-1" / "trainer.json"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "the study never reached the second arm's first checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up: like a lost machine
    proc.wait()

    store = StudyStore(study_dir / "study.sqlite")
    before = {r["run_id"]: r for r in store.all()}
    assert before["sft-s0"]["status"] == "trained"
    assert before["dpo_grit-s0"]["status"] == "training"
    assert before["cita-s0"]["status"] == "pending"

    runner = StudyRunner(load_study(ROOT / "configs" / "study_demo.yaml", args))
    runner.run()
    after = {r["run_id"]: r for r in store.all()}
    assert all(r["status"] == "evaluated" for r in after.values())
    # the finished arm was not retrained: its stored summary is byte-identical
    assert after["sft-s0"]["train_summary"] == before["sft-s0"]["train_summary"]
    steps = [
        json.loads(x)["step"] for x in (study_dir / "runs" / "dpo_grit-s0" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3]  # resumed from its checkpoint; every step logged once
    for f in ("results.md", "results.csv", "results.json", "study.yaml"):
        assert (study_dir / f).exists()
    assert list((study_dir / "tensorboard").glob("*/events.out.tfevents.*"))

    # a third invocation has nothing left to do
    stamps = {r["run_id"]: r["updated_at"] for r in store.all()}
    StudyRunner(load_study(ROOT / "configs" / "study_demo.yaml", args)).run()
    assert {r["run_id"]: r["updated_at"] for r in store.all()} == stamps


def test_changed_config_for_existing_run_is_refused(tmp_path, tiny_model_dir):
    args = _overrides(tmp_path / "s", tiny_model_dir, steps=1)
    StudyRunner(load_study(ROOT / "configs" / "study_demo.yaml", args))
    with pytest.raises(ValueError, match="different configuration"):
        # (not the shared lr: with calibration on, each arm's lr is the sweep's choice)
        StudyRunner(load_study(ROOT / "configs" / "study_demo.yaml", args + ["train.method.beta=0.3"]))


def test_arm_configs_share_everything_but_method_optimizer_placement(tmp_path, tiny_model_dir):
    cfg = load_study(ROOT / "configs" / "study_demo.yaml", [f"study_dir={tmp_path}"])
    configs = {a.name: cfg.arm_config(a, 0).model_dump() for a in cfg.arms if a.trained}
    shared = ("model", "lora", "data", "schedule", "train", "seed")
    for name, c in configs.items():
        for k in shared:
            assert c[k] == configs["sft"][k], (name, k)
        assert c["optimizer"]["lr"] == configs["sft"]["optimizer"]["lr"]
    assert configs["dpo_grit"]["optimizer"]["name"] == "grit" and configs["dpo"]["optimizer"]["name"] == "adamw"
    # every GRIT arm trains with the study's one GRIT block, train.optimizer.grit, as the YAML writes it
    assert configs["dpo_grit"]["optimizer"]["grit"] == {"reproject_steps": 3, "reproject_warmup": 2}


def test_every_shipped_config_parses():
    from ecliptica.config import load_config
    from ecliptica.evaluation.config import EvalConfig

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if path.name.startswith("study_"):
            load_study(path)
        elif path.name.startswith("eval_"):
            load_config(path, cls=EvalConfig)
        else:
            load_config(path)


def test_store_claims_are_exclusive(tmp_path):
    store = StudyStore(tmp_path / "s.sqlite")
    store.register("a-s0", "a", 0, "h", {})
    other = StudyStore(tmp_path / "s.sqlite")  # a second process's connection
    assert store.claim("a-s0", "worker0")
    assert not other.claim("a-s0", "worker1")
    store.release("a-s0")
    assert other.claim("a-s0", "worker1")
    assert store.get("a-s0")["worker"] == "worker1"


def test_arms_with_an_instruction_are_evaluated_with_and_without_it(tmp_path):
    from ecliptica.evaluation.config import EvalConfig

    arms = (
        "[{name: baseline, method: baseline}, {name: sft, method: sft}, {name: cita, method: cita}, "
        "{name: dpo_pre, method: dpo, placement: prepend}]"
    )
    cfg = load_study(
        ROOT / "configs" / "study_demo.yaml",
        [f"study_dir={tmp_path}", f"arms={arms}", "train.data.instruction=Refuse harm."],
    )
    runner = StudyRunner(cfg)
    by_name = {a.name: a for a in cfg.arms}
    variants = {n: runner._with_training_instruction({}, by_name[n], 0) for n in by_name}
    assert variants["sft"] == {"placements": ["none"]}  # trained without an instruction
    assert variants["cita"] == {"placements": ["none", "system"], "instruction": "Refuse harm."}
    assert variants["dpo_pre"] == {"placements": ["none", "prepend"], "instruction": "Refuse harm."}
    assert variants["baseline"]["placements"] == ["none", "system", "prepend"]  # a base for every variant
    ecfg = EvalConfig.model_validate({"behaviour": variants["cita"]})
    assert ecfg.behaviour.shown_placement == "none"  # the headline stays comparable across arms
    per_row = load_study(ROOT / "configs" / "study_demo.yaml", [f"study_dir={tmp_path / 'b'}", f"arms={arms}"])
    assert StudyRunner(per_row)._with_training_instruction({}, by_name["cita"], 0) == {"placements": ["none"]}
