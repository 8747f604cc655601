"""What the notebooks show, through the library functions they call (ecliptica.study.notebook)."""

import json
from pathlib import Path

import pytest

from ecliptica.study import notebook as nb

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "configs" / "study_demo.yaml"
DEMO = ROOT / "src" / "ecliptica" / "data" / "demo" / "preference_pairs.jsonl"


def _study(tmp_path, model_dir, arms=None, extra=()):
    overrides = [
        f"train.model.name={model_dir}",
        "train.train.max_steps=2",
        "train.train.progress=false",
        "train.data.limit=16",
        "evaluation.data.limit=48",
        "evaluation.behaviour.limit=8",
        "evaluation.behaviour.max_new_tokens=4",
        "evaluation.drift.limit=4",
        f"evaluation.cache_dir={tmp_path}/cache",
        "evaluation.progress=false",
        *extra,
    ]
    if arms:
        overrides.append(f"arms={arms}")
    return nb.open_study(str(STUDY), str(tmp_path / "study"), overrides)


def test_arm_notebooks_differ_only_in_arm_and_are_committed_without_outputs():
    import nbformat

    paths = sorted(p for p in (ROOT / "comparative_study").glob("0[1-6]_*/*.ipynb"))
    assert len(paths) == 6
    bodies = []
    for path in paths:
        book = nbformat.read(path, as_version=4)
        arm = path.parent.name.split("_", 1)[1]
        assert path.stem == arm
        config = next(c for c in book.cells if c.cell_type == "code" and "ARM = " in c.source)
        assert f'ARM = "{arm}"' in config.source.splitlines()
        bodies.append(
            [
                (c.cell_type, "\n".join(x for x in c.source.splitlines() if not x.startswith("ARM = ")))
                for c in book.cells
            ]
        )
    assert all(b == bodies[0] for b in bodies)
    for path in sorted((ROOT / "comparative_study").rglob("*.ipynb")):
        for c in nbformat.read(path, as_version=4).cells:
            assert c.cell_type != "code" or (c.outputs == [] and c.execution_count is None), path


@pytest.mark.parametrize(
    "arm, system, responses",
    [("sft", None, ["chosen"]), ("dpo", None, ["chosen", "rejected"]), ("cita", "instruction", ["chosen", "rejected"])],
)
def test_training_example_is_the_chat_template_text_with_the_completion_marked(
    tmp_path, tokenizer, embedded_dir, arm, system, responses
):
    """Reference: the raw demo row through the tokenizer's own chat template (the method's instruction
    placement done by hand: CITA puts the row's instruction in the system turn), then the response and EOS."""
    runner = _study(tmp_path, embedded_dir)
    text = nb.training_example(runner, arm)
    row_id = text.split(" row ", 1)[1].split()[0]
    row = next(r for r in map(json.loads, DEMO.read_text().splitlines()) if r["id"] == row_id)
    messages = ([{"role": "system", "content": row["instruction"]}] if system else []) + row["messages"]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for name in ("chosen", "rejected"):
        shown = prompt + nb.COMPLETION_MARK + row[name] + tokenizer.eos_token
        assert (shown in text) == (name in responses), name
    assert (row["instruction"] in text) == bool(system)  # DPO and SFT train without the instruction


def test_training_example_shows_the_truncated_prompt(tmp_path, tokenizer, embedded_dir):
    """With max_prompt_length 8 the model sees the prompt's last 8 tokens, not the rendered text."""
    runner = _study(tmp_path, embedded_dir, extra=["train.data.max_prompt_length=8"])
    text = nb.training_example(runner, "dpo")
    row_id = text.split(" row ", 1)[1].split()[0]
    row = next(r for r in map(json.loads, DEMO.read_text().splitlines()) if r["id"] == row_id)
    full = tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
    tail = tokenizer.decode(tokenizer(full, add_special_tokens=False)["input_ids"][-8:])
    assert "tokens: prompt 8," in text
    assert f"----- prompt + chosen\n{tail}{nb.COMPLETION_MARK}{row['chosen']}" in text
    assert full not in text


def test_config_yaml_is_the_arms_resolved_config(tmp_path, embedded_dir):
    import yaml

    runner = _study(tmp_path, embedded_dir, extra=["train.optimizer.lr=0.001"])
    cfg = yaml.safe_load(nb.config_yaml(runner, "cita_grit"))
    assert cfg["method"]["name"] == "cita" and cfg["optimizer"]["name"] == "grit"
    assert cfg["optimizer"]["lr"] == 0.001
    assert cfg["optimizer"]["grit"]["reproject_steps"] == 3  # the study's shared grit block
    assert cfg["run_dir"] == str(tmp_path / "study" / "runs" / "cita_grit-s0")
    with pytest.raises(ValueError, match="baseline"):
        nb.config_yaml(runner, "baseline")


def test_evaluation_names_missing_arms_trains_them_only_when_asked_and_logs_eval_scalars(
    tmp_path, tiny_model_dir, capsys
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runner = _study(tmp_path, tiny_model_dir, arms="[{name: baseline, method: baseline}, {name: sft, method: sft}]")
    assert nb.missing_arms(runner) == {"sft": [0]}

    nb.evaluate(runner, train_missing=False)
    out = capsys.readouterr().out
    assert "Not trained yet, so not evaluated: sft (seeds 0)." in out
    assert "TRAIN_MISSING = True" in out and nb.train_command(runner) in out
    status = {r["run_id"]: r["status"] for r in runner.store.all()}
    assert status == {"baseline-s0": "evaluated", "sft-s0": "pending"}  # nothing trained silently
    assert not (runner.dir / "runs" / "sft-s0" / "metrics.jsonl").exists()
    assert "sft-s0" in (runner.dir / "results.md").read_text()  # named as not evaluated

    nb.evaluate(runner, train_missing=True)
    assert {r["status"] for r in runner.store.all()} == {"evaluated"}
    assert nb.missing_arms(runner) == {}

    # every run's evaluation numbers are TensorBoard scalars, read back against its eval.json
    for rid, step in (("baseline-s0", 0), ("sft-s0", 2)):
        result = json.loads((runner.dir / "runs" / rid / "eval" / "eval.json").read_text())
        events = EventAccumulator(str(runner.dir / "tensorboard" / rid))
        events.Reload()
        behaviour = result["behaviour"]["none"]
        expected = {
            "eval/aqi": result["aqi_layers"]["discriminant"]["aqi"],  # the headline (docs/aqi.md)
            "eval/aqi_geometric": result["aqi_layers"]["geometric"]["aqi"],
            "eval/refusal_rate_unsafe": behaviour["refusal_rate_unsafe"]["rate"],
            "eval/over_refusal_rate_safe": behaviour["over_refusal_rate_safe"]["rate"],
            "eval/perplexity": result["drift"]["perplexity"],
            "eval/kl_mean_token": result["drift"]["kl_mean_token"],
        }
        for tag, value in expected.items():
            (event,) = events.Scalars(tag)
            assert event.value == pytest.approx(value, rel=1e-6, abs=1e-7), (rid, tag)
            assert event.step == step  # at the end of the run's training curve
    assert "loss" in EventAccumulator(str(runner.dir / "tensorboard" / "sft-s0")).Reload().Tags()["scalars"]


def test_eval_scalars_are_the_summarys_numbers_by_name():
    from ecliptica.evaluation.summary import EvalSummary
    from ecliptica.study.tb import eval_scalars

    s = EvalSummary(
        aqi={"value": 0.25},
        aqi_gamma=0.3,
        aqi_layer=5,
        n_prompts=48,
        refusal_rate_unsafe={"rate": 0.5, "n": 8},
        perplexity=None,
        collapsed=False,
        over_refusal_rate_safe_by_placement={"none": {"rate": 0.125, "n": 8}, "system": {"rate": 0.375, "n": 8}},
    )
    assert eval_scalars(s) == {
        "eval/aqi": 0.25,
        "eval/refusal_rate_unsafe": 0.5,
        "eval/over_refusal_rate_safe_by_placement/none": 0.125,
        "eval/over_refusal_rate_safe_by_placement/system": 0.375,
    }
    assert eval_scalars(EvalSummary(aqi={"value": None})) == {}
