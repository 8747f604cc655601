"""Data parallel: 2 processes (gloo, CPU) give the same per-step losses as 1 process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd_prefix, run_dir, model_dir, micro_batch, env):
    sets = [
        f"run_dir={run_dir}",
        f"model.name={model_dir}",
        "model.dtype=fp32",
        "train.max_steps=3",
        f"train.micro_batch_size={micro_batch}",
        "train.grad_accum=1",
        "train.mixed_precision=no",
        "train.progress=false",
        "optimizer.lr=5e-3",
        "schedule.name=constant",
        "lora.r=4",
        "data.limit=24",
        "data.max_length=160",
        "data.max_prompt_length=96",
    ]
    cmd = cmd_prefix + ["-m", "ecliptica.cli", "train", str(ROOT / "configs" / "train_demo_dpo.yaml")]
    cmd += [x for s in sets for x in ("--set", s)]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return [x["loss"] for x in lines], summary


def test_two_processes_match_one_process(tmp_path, tiny_model_dir):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    one, s1 = _run([sys.executable], tmp_path / "one", tiny_model_dir, 4, env)
    two, s2 = _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"],
        tmp_path / "two",
        tiny_model_dir,
        2,
        env,
    )
    assert s2["num_processes"] == 2 and s1["num_processes"] == 1
    assert s2["train_tokens"] == s1["train_tokens"]  # the same pairs were seen
    assert len(two) == len(one) == 3
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a))
    assert one[-1] != one[0]  # training moved: the comparison is not trivially equal
