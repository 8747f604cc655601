"""Study design: the recorded train/val split, the calibration rule, the prompt-only arm, dev/test sets."""

import json
from pathlib import Path

import pytest

from ecliptica.config import TrainConfig
from ecliptica.study.calibration import choose, sweep
from ecliptica.study.config import CalibrationSection
from ecliptica.study.runner import StudyRunner, load_study
from ecliptica.train.engine import prepare_data

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "study_demo.yaml"


# ------------------------------------------------------------------ the split


def _split(tokenizer, **data):
    cfg = TrainConfig.model_validate({"data": {"path": "demo:preferences", "format": "generic", **data}})
    return prepare_data(cfg, tokenizer, "none", progress=False)[1]["split_ids"]


def test_split_is_deterministic_disjoint_complete_and_recorded(tokenizer):
    a = _split(tokenizer, val_fraction=0.3, split_seed=0)
    all_ids = {e["id"] for e in map(json.loads, (ROOT / "src/ecliptica/data/demo/preference_pairs.jsonl").open())}
    assert set(a["train"]).isdisjoint(a["val"]) and set(a["train"]) | set(a["val"]) == all_ids
    assert (a["n_train"], a["n_val"]) == (len(a["train"]), len(a["val"])) and a["n_val"] > 0
    assert _split(tokenizer, val_fraction=0.3, split_seed=0) == a  # same seed: same split, same hashes
    b = _split(tokenizer, val_fraction=0.3, split_seed=1)
    assert set(b["val"]) != set(a["val"]) and b["val_ids_hash"] != a["val_ids_hash"]
    # appending rows never moves an existing row: the first 20 rows keep their side
    head = _split(tokenizer, val_fraction=0.3, split_seed=0, limit=20)
    assert set(head["val"]) == set(a["val"]) & (set(head["train"]) | set(head["val"]))


def test_training_seed_does_not_move_the_split(tokenizer):
    """Every arm and training seed of a study is scored on the same validation pairs."""
    cfgs = [TrainConfig.model_validate({"seed": s, "data": {"val_fraction": 0.3}}) for s in (0, 7)]
    ids = [prepare_data(c, tokenizer, "none", progress=False)[1]["split_ids"]["val"] for c in cfgs]
    assert ids[0] == ids[1]


# ------------------------------------------------------------------ the rule


def _row(lr, acc, kl, damping=None):
    return {"point_id": f"p{lr}-{damping}", "lr": lr, "damping": damping, "val_accuracy": acc, "benign_kl": kl}


ROWS = [_row(1e-5, 0.60, 0.01), _row(3e-5, 0.70, 0.02), _row(1e-4, 0.80, 0.08), _row(3e-4, 0.75, 0.20)]


def test_choose_takes_the_best_accuracy_inside_the_kl_bound():
    best, why = choose(ROWS, CalibrationSection(kl_bound=0.05))
    assert best["lr"] == 3e-5 and "best validation accuracy" in why  # 1e-4 is better but drifts too far
    best, _ = choose(ROWS, CalibrationSection(kl_bound=0.1))  # control: a looser bound admits it
    assert best["lr"] == 1e-4


def test_choose_ties_go_to_the_smaller_lr_and_no_feasible_point_takes_the_smallest_kl():
    tied = [_row(1e-4, 0.70, 0.03), _row(3e-5, 0.70, 0.04), _row(1e-5, 0.50, 0.001)]
    assert choose(tied, CalibrationSection(kl_bound=0.05))[0]["lr"] == 3e-5
    near = [_row(1e-4, 0.72, 0.03), _row(3e-5, 0.70, 0.04)]
    assert choose(near, CalibrationSection(kl_bound=0.05))[0]["lr"] == 1e-4
    assert choose(near, CalibrationSection(kl_bound=0.05, accuracy_tolerance=0.05))[0]["lr"] == 3e-5
    best, why = choose(ROWS, CalibrationSection(kl_bound=0.001))
    assert best["lr"] == 1e-5 and "no point" in why


def test_grit_arms_sweep_damping_too():
    cfg = load_study(
        DEMO,
        [
            "calibration.enabled=true",
            "train.data.val_fraction=0.25",
            "calibration.lrs=[1.0e-4, 3.0e-4]",
            "calibration.grit_dampings=[0.001, 0.1]",
        ],
    )
    arms = {a.name: a for a in cfg.arms}
    assert [(p["lr"], p["damping"]) for p in sweep(cfg, arms["dpo"])] == [(1e-4, None), (3e-4, None)]
    grit = sweep(cfg, arms["dpo_grit"])
    assert len(grit) == 4 and {p["damping"] for p in grit} == {0.001, 0.1}
    tc = cfg.arm_config(arms["dpo_grit"], 0, grit[-1]["settings"])
    assert (tc.optimizer.lr, tc.optimizer.grit["damping"]) == (3e-4, 0.1)


def test_a_choice_made_before_the_sweep_grew_is_not_reused(tmp_path):
    """Adding an lr to the sweep must score it and choose again: the stored choice never saw it."""
    from ecliptica.study.calibration import calibrate, chosen_settings
    from ecliptica.study.store import StudyStore

    base = [
        "calibration.enabled=true",
        "train.data.val_fraction=0.25",
        "calibration.arms=[dpo]",
        f"study_dir={tmp_path}",
    ]
    old = load_study(DEMO, base + ["calibration.lrs=[1.0e-4, 3.0e-4]"])
    grown = load_study(DEMO, base + ["calibration.lrs=[3.0e-5, 1.0e-4, 3.0e-4]"])
    store = StudyStore(tmp_path / "study.sqlite")

    def score(pid, acc, kl):
        store.set_point(pid, "scored", scores={"val": {"rewards/accuracies": acc}, "benign": {"kl_mean_token": kl}})

    from ecliptica.study.calibration import register_points

    register_points(old, store)
    score("dpo-lr0.0001", 0.60, 0.01)
    score("dpo-lr0.0003", 0.55, 0.02)
    assert calibrate(old, store)["dpo"] == {"optimizer.lr": 1e-4}  # all scored: chooses without training
    assert chosen_settings(old, store)["dpo"] == {"optimizer.lr": 1e-4}

    register_points(grown, store)
    assert chosen_settings(grown, store) is None  # 3e-5 is not scored yet: the old choice is not reused
    score("dpo-lr3e-05", 0.65, 0.005)
    assert chosen_settings(grown, store) is None  # scored, but the stored flag is on the old choice
    assert calibrate(grown, store)["dpo"] == {"optimizer.lr": 3e-5}
    assert [p["point_id"] for p in store.calibration() if p["chosen"]] == ["dpo-lr3e-05"]
    # control: the old sweep ignores the better point outside it and chooses 1e-4 again
    assert chosen_settings(old, store) is None
    assert calibrate(old, store)["dpo"] == {"optimizer.lr": 1e-4}


@pytest.mark.parametrize(
    "override, message",
    [
        ("calibration.lr_grid=[0.1]", "lr_grid"),
        ("calibration.kl_bound=0", "kl_bound"),
        ("evaluation_sets={dev: {path: 'demo:eval'}}", "test"),
        ("evaluation_sets={test: {path: 'demo:eval', benign: x}}", "benign"),
        (
            "arms=[{name: baseline, method: baseline}, {name: p, method: prompt_only, instruction: x, extra: 1}]",
            "extra",
        ),
        ("arms=[{name: baseline, method: baseline}, {name: p, method: prompt_only}]", "needs an instruction"),
        ("train.data.val_fraction=0.0", "validation split"),
        ("calibration.arms=[dpo, baseline]", "not trained arms"),
    ],
)
def test_bad_study_blocks_are_errors(override, message):
    base = ["calibration.enabled=true", "train.data.val_fraction=0.25"]
    with pytest.raises(ValueError, match=message):
        load_study(DEMO, base + [override])


# ------------------------------------------------------------------ a tiny real study


def test_tiny_calibrated_study_with_prompt_only_arm_and_dev_test_sets(tmp_path, tiny_model_dir):
    study_dir = tmp_path / "s"
    sets = "{dev: {path: 'demo:eval', limit: 24, seed: 1}, test: {path: 'demo:eval', limit: 40}}"
    args = [
        f"study_dir={study_dir}",
        f"train.model.name={tiny_model_dir}",
        "train.train.max_steps=2",
        "train.train.save_every=1",
        "train.train.progress=false",
        "train.data.limit=24",
        "train.data.val_fraction=0.3",
        "calibration.enabled=true",
        "calibration.arms=null",
        "calibration.lrs=[1.0e-4, 5.0e-2]",
        "calibration.max_steps=1",
        "calibration.kl_bound=1000",
        f"evaluation_sets={sets}",
        "evaluation.behaviour.limit=8",
        "evaluation.behaviour.max_new_tokens=4",
        "evaluation.drift.limit=4",
        f"evaluation.cache_dir={study_dir}/cache",
        "evaluation.progress=false",
        "arms=[{name: baseline, method: baseline}, {name: po, method: prompt_only, instruction: 'Be safe.'}, "
        "{name: dpo, method: dpo}, {name: sft, method: sft}]",
    ]
    cfg = _load_without_eval_data(args)
    runner = StudyRunner(cfg)
    assert runner.calibrated is None and runner.store.all() == []  # final runs wait for the choice
    runner.run()
    store = runner.store

    # SFT has no beta of its own: its points are scored with calibration.reward_beta like every other arm's
    assert all(p["status"] == "scored" for p in store.calibration())
    assert {p["scores"]["val"]["beta"] for p in store.calibration()} == {cfg.calibration.reward_beta}
    points = [p for p in store.calibration() if p["arm"] == "dpo"]
    assert [p["lr"] for p in points] == [1e-4, 5e-2]
    rows = [
        {
            "point_id": p["point_id"],
            "lr": p["lr"],
            "val_accuracy": p["scores"]["val"]["rewards/accuracies"],
            "benign_kl": p["scores"]["benign"]["kl_mean_token"],
        }
        for p in points
    ]
    want = max(rows, key=lambda r: (r["val_accuracy"], -r["lr"]))  # the rule by hand (every KL is inside 1000)
    assert [p["point_id"] for p in points if p["chosen"]] == [want["point_id"]]
    final = json.loads((study_dir / "runs" / "dpo-s0" / "summary.json").read_text())
    assert runner.arm_config(cfg.arms[2], 0).optimizer.lr == want["lr"]
    assert final["steps"] == 2 and final["epochs"] > 0

    # one split, recorded once: the calibration and the final run trained on the same pairs
    split = store.splits()["preference"]
    assert final["data"]["split"] == split and split["n_val"] == points[0]["scores"]["val"]["n_pairs"]
    assert {"eval:dev", "eval:test"} <= set(store.splits())
    ids = json.loads((study_dir / "runs" / "dpo-s0" / "split.json").read_text())
    assert set(ids["train"]).isdisjoint(ids["val"])

    # every run evaluated on dev and test; the report reads test
    evals = store.evaluations()
    assert {(e["run_id"], e["split"]) for e in evals} == {
        (r, s) for r in ("baseline-s0", "po-s0", "dpo-s0", "sft-s0") for s in ("dev", "test")
    }
    test_rows = {e["run_id"]: e["eval_result"] for e in store.evaluations("test")}
    assert all(store.get(r)["eval_result"] == test_rows[r] for r in test_rows)
    assert all(Path(r["embeddings_path"]).parent.name == "test" for r in runner.records())  # the report reads test
    po = json.loads((study_dir / "runs" / "po-s0" / "eval" / "test" / "eval.json").read_text())
    assert po["settings"]["embeddings"]["placement"] == "system" and po["settings"]["adapter"] is None
    assert po["settings"]["embeddings"]["instruction"] == "Be safe."
    md = (study_dir / "results.md").read_text()
    assert "## Calibration" in md and md.index("## Calibration") < md.index("## Research questions")
    assert (study_dir / "calibration.csv").exists() and (study_dir / "figures" / "calibration_sweep.png").exists()

    # a copied study without its store (e.g. a committed result): --report-only rebuilds the same section
    from ecliptica.study.runner import report_study

    section = md[md.index("## Calibration") : md.index("## Research questions")]
    (study_dir / "study.sqlite").rename(tmp_path / "moved.sqlite")
    report_study(cfg)
    assert section in (study_dir / "results.md").read_text()


def test_calibration_csv_is_read_back_with_its_types_and_bad_rows_are_named(tmp_path):
    from ecliptica.study.calibration import stored_calibration_rows, write_calibration

    rows = [
        {
            "arm": "dpo",
            "lr": 3e-5,
            "damping": None,
            "status": "scored",
            "val_accuracy": 0.625,
            "val_margin": -0.5,
            "benign_kl": 0.0125,
            "n_val_pairs": 226,
            "epochs": 1.04,
            "feasible": True,
            "chosen": True,
        },
        {
            "arm": "dpo_grit",
            "lr": 1e-4,
            "damping": 0.1,
            "status": "failed",
            "val_accuracy": None,
            "val_margin": None,
            "benign_kl": None,
            "n_val_pairs": None,
            "epochs": None,
            "feasible": None,
            "chosen": False,
        },
    ]
    (tmp_path / "figures").mkdir()
    write_calibration(rows, tmp_path, CalibrationSection(kl_bound=0.1))
    assert stored_calibration_rows(tmp_path) == rows
    assert stored_calibration_rows(tmp_path / "nothing") is None
    text = (tmp_path / "calibration.csv").read_text().replace("0.0125", "lots")
    (tmp_path / "calibration.csv").write_text(text)
    with pytest.raises(ValueError, match=r"calibration.csv, line 2: .*lots"):
        stored_calibration_rows(tmp_path)


def _load_without_eval_data(args):
    """The demo config with its evaluation.data block removed (evaluation_sets replace it)."""
    import yaml

    from ecliptica.config import apply_overrides
    from ecliptica.study.config import StudyConfig

    raw = yaml.safe_load(DEMO.read_text())
    raw["evaluation"].pop("data")
    return StudyConfig.model_validate(apply_overrides(raw, args))
