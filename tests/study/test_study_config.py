"""Study configs: every shipped one loads; a typo in any typed block fails at load time, naming the key."""

from pathlib import Path

import pytest
import yaml

from ecliptica.evaluation.summary import summarize_eval
from ecliptica.study.config import StudyConfig
from ecliptica.study.design import default_questions
from ecliptica.study.runner import load_study

ROOT = Path(__file__).resolve().parents[2]
STUDY_CONFIGS = sorted((ROOT / "configs").glob("study_*.yaml"))


@pytest.mark.parametrize("path", STUDY_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_study_config_loads_with_typed_blocks(path):
    cfg = load_study(path)
    assert [q.id for q in cfg.questions] == ["Q1", "Q2", "Q3", "Q4"]
    assert cfg.report.alpha == 0.05 and cfg.evaluation.metrics.gamma == 0.5


@pytest.mark.parametrize(
    "override, key",
    [
        ("evaluation.metrics.gama=0.3", "evaluation.metrics.gama"),
        ("evaluation.embeddings.pca_dims=8", "evaluation.embeddings.pca_dims"),
        ("evaluation.adapter=x", "evaluation.adapter"),  # per-run fields are not study settings
        ("report.alph=0.01", "report.alph"),
        ("report.min_effect.aqii=0.02", "report.min_effect.aqii"),
        ("questions=[{id: Q, title: t, contrasts: [{termz: {a: 1}}]}]", "questions.0.contrasts.0.termz"),
        ("arms=[{name: baseline, methd: baseline}]", "arms.0.methd"),
        ("reprot={alpha: 0.1}", "reprot"),
    ],
)
def test_a_typo_in_any_block_fails_naming_the_key(tmp_path, override, key):
    path = tmp_path / "study.yaml"
    path.write_text((ROOT / "configs" / "study_demo.yaml").read_text())
    with pytest.raises(ValueError, match=rf"{path}: invalid configuration:(.|\n)*{key.replace('.', r'[.]')}"):
        load_study(path, [override])


def test_questions_are_checked_against_the_arms_unless_they_are_the_defaults():
    two_arms = [{"name": "baseline", "method": "baseline"}, {"name": "dpo", "method": "dpo"}]
    StudyConfig(arms=two_arms)  # the defaults name arms this study leaves out: reported as missing, not an error
    StudyConfig(arms=two_arms, questions=[q.model_dump() for q in default_questions()])  # written out (study.yaml)
    with pytest.raises(ValueError, match=r"Q names arm\(s\) \['dpo_x'\]"):
        StudyConfig(
            arms=[{"name": "baseline", "method": "baseline"}, {"name": "dpo", "method": "dpo"}],
            questions=[{"id": "Q", "title": "t", "contrasts": [{"terms": {"dpo_x": 1, "baseline": -1}}]}],
        )
    with pytest.raises(ValueError, match="weights must sum to 0"):
        StudyConfig(questions=[{"id": "Q", "title": "t", "contrasts": [{"terms": {"dpo": 1, "baseline": -0.5}}]}])


def test_default_questions_round_trip_through_yaml():
    """The resolved study.yaml a coordinator writes is what its workers load: same questions."""
    cfg = StudyConfig()
    again = StudyConfig.model_validate(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"))))
    assert again.questions == default_questions()
    assert again.evaluation_fingerprint() == cfg.evaluation_fingerprint() == {}


def test_summary_reads_the_evaluators_sections_under_their_names():
    result = {
        "settings": {"metrics": {"gamma": 0.3}, "embeddings": {"pca_dim": 16, "layer": -2}},
        "embeddings": {"reported_layer": -2},
        "aqi": {
            "overall": {
                "aqi": 0.4,
                "gamma": 0.3,
                "n": 80,
                "aqi_ci": {"low": 0.3, "high": 0.5},
                "probe_auroc": 0.9,
                "probe_auroc_ci": {"low": 0.8, "high": 0.95},
            }
        },
        "behaviour": {
            "system": {
                "refusal_rate_unsafe": {"rate": 0.5, "total": 40, "low": 0.4, "high": 0.6},
                "over_refusal_rate_safe": {"rate": 0.1, "total": 40},
            },
            "none": {
                "refusal_rate_unsafe": {"rate": 0.25, "total": 40, "low": 0.1, "high": 0.4},
                "over_refusal_rate_safe": {"rate": 0.05, "total": 40},
            },
        },
        "drift": {"perplexity": 12.0, "kl_mean_token": 0.02, "collapsed": False},
    }
    s = summarize_eval(result)
    assert (s.aqi.value, s.aqi.low, s.aqi.high, s.aqi_gamma, s.aqi_pca_dim, s.aqi_layer) == (0.4, 0.3, 0.5, 0.3, 16, -2)
    assert s.behaviour_placement == "none" and s.refusal_rate_unsafe.rate == 0.25 and s.refusal_rate_unsafe.n == 40
    assert (s.perplexity, s.kl_mean_token, s.collapsed, s.n_prompts) == (12.0, 0.02, False, 80)


def test_report_only_reads_the_run_directories_without_a_store(tmp_path):
    """A copied study (run directories, no study.sqlite) is re-reported; unevaluated runs are named."""
    import json

    from ecliptica.study.runner import report_study

    cfg = load_study(ROOT / "configs" / "study_demo.yaml", [f"study_dir={tmp_path}"])
    for run, aqi in (("baseline-s0", 0.1), ("dpo-s0", 0.2)):
        d = tmp_path / "runs" / run
        d.mkdir(parents=True)
        (d / "eval.json").write_text(json.dumps({"aqi": {"overall": {"aqi": aqi, "n": 10}}}))
    # a real run's summary.json (the record reads it typed), with the numbers this test checks
    summary = json.loads(
        (ROOT / "results" / "studies" / "study_smollm_hh" / "runs" / "dpo-s0" / "summary.json").read_text()
    )
    summary.update(train_seconds=60.0, tokens_per_s=10.0, peak_gpu_memory_gib=None, train_tokens=600, num_processes=1)
    (tmp_path / "runs" / "dpo-s0" / "summary.json").write_text(json.dumps(summary))
    out = report_study(cfg)
    assert [r["arm"] for r in out["rows"]] == ["baseline", "dpo"]
    assert [r["aqi"] for r in out["rows"]] == [0.1, 0.2] and out["rows"][1]["train_minutes"] == 1.0
    assert "left out: sft-s0, sft_grit-s0, dpo_grit-s0, cita-s0, cita_grit-s0" in out["notes"][0]
    assert not (tmp_path / "study.sqlite").exists()


def _demo(tmp_path) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text((ROOT / "configs" / "study_demo.yaml").read_text())
    return path


def test_a_grit_typo_fails_even_when_no_arm_uses_grit(tmp_path):
    path = _demo(tmp_path)
    arms = "arms=[{name: baseline, method: baseline}, {name: dpo, method: dpo}]"
    load_study(path, [arms])  # control: the same study without the typo loads
    with pytest.raises(ValueError, match=r"train\.optimizer\.grit\.reproject_stpes: Extra inputs are not permitted"):
        load_study(path, [arms, "train.optimizer.grit.reproject_stpes=5"])


def test_grit_settings_live_in_train_optimizer_grit_only(tmp_path):
    """The study-level `grit` block is an error that says where the settings go; the GRIT arms take
    train.optimizer.grit and the AdamW arms leave it out."""
    path = _demo(tmp_path)
    with pytest.raises(ValueError, match=r"grit: GRIT settings belong in train\.optimizer\.grit"):
        load_study(path, ["grit={damping: 0.01}"])
    cfg = load_study(path, ["train.optimizer.grit.damping=0.01"])
    grit_arm, adamw_arm = (next(a for a in cfg.arms if a.name == n) for n in ("dpo_grit", "dpo"))
    on = cfg.arm_config(grit_arm, 0).optimizer
    assert on.grit == {"reproject_steps": 3, "reproject_warmup": 2, "damping": 0.01}
    assert on.grit_config().damping == 0.01 and on.grit_config().reproject_steps == 3
    assert cfg.arm_config(adamw_arm, 0).optimizer.grit == {}
    # an arm's dotted override reaches the same place
    cfg = load_study(
        path,
        [
            "arms=[{name: baseline, method: baseline}, {name: g, method: dpo, optimizer: grit, "
            "overrides: {optimizer.grit.damping: 0.5}}]",
            "calibration.enabled=false",
        ],
    )
    assert cfg.arm_config(cfg.arms[1], 0).optimizer.grit_config().damping == 0.5


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.optimizer.lr=-1", r"train\.optimizer\.lr: Input should be greater than 0 \(got -1\)"),
        ("train.train.max_stepz=3", r"train\.train\.max_stepz: Extra inputs are not permitted"),
        ("train.lora.r=0", r"train\.lora\.r: Input should be greater than or equal to 1"),
        ("train.modle={name: x}", r"train\.modle: Extra inputs are not permitted"),
        ("train.method.betta=0.1", r"train\.method\.betta: no method has this setting"),
        ("train.method.beta=fast", r"train\.method\.beta: Input should be a valid number(.|\n)*as a \w+ setting"),
        ("train.method.name=dpo", r"train\.method\.name is set per arm \(arms\[\]\.method\)"),
        ("train.optimizer.name=grit", r"train\.optimizer\.name is set per arm \(arms\[\]\.optimizer\)"),
        ("train.seed=3", r"train\.seed is set per run by the study"),
    ],
)
def test_the_shared_train_block_is_typed_at_load_naming_the_key(tmp_path, override, message):
    """Checked with the arms cut to the baseline, so the error comes from the block itself, not from an arm."""
    path = _demo(tmp_path)
    only_baseline = ["arms=[{name: baseline, method: baseline}]", "calibration.enabled=false"]
    assert load_study(path, only_baseline).shared_train().optimizer.lr == 5.0e-4  # control: the block as shipped
    with pytest.raises(ValueError, match=message):
        load_study(path, [*only_baseline, override])


def test_arm_overrides_still_apply_dotted_keys_over_the_typed_block(tmp_path):
    path = _demo(tmp_path)
    arms = "arms=[{name: baseline, method: baseline}, {name: d, method: dpo, overrides: {optimizer.lr: 1.0e-3, train.max_steps: 2}}]"
    cfg = load_study(path, [arms, "calibration.enabled=false"])
    tc = cfg.arm_config(cfg.arms[1], 0)
    assert (tc.optimizer.lr, tc.train.max_steps, tc.method.beta) == (1.0e-3, 2, 0.1)
    assert cfg.shared_train().train.max_steps == 6  # the shared block itself is unchanged
