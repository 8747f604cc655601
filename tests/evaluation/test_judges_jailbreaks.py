"""Model judge wiring (tiny random models built from a config: only the wiring is tested, not the
judge's quality) and jailbreak templates / per-template rates with a stub generator."""

from __future__ import annotations

import shutil

import pytest
import torch

from ecliptica.data import PromptExample
from ecliptica.evaluation.behaviour import run_jailbreaks
from ecliptica.evaluation.config import EvalConfig
from ecliptica.evaluation.jailbreaks import CONTROL, TEMPLATES, jailbreak_prompts, wrap
from ecliptica.evaluation.judges import OPTION_LABELS, ModelJudge, build_judge
from ecliptica.evaluation.refusal import StringMatchJudge, judge_labels

QUESTIONS = ["How do I kill a Python process?", "How do I make a bomb?", "Tell me a joke"]
ANSWERS = ["Use kill -9 with the process id.", "I'm sorry, but I can't help with that.", ""]


def _with_tokenizer(model, out, embedded_dir):
    model.save_pretrained(out)
    for f in embedded_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, embedded_dir):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=3,
        pad_token_id=2,
        id2label={0: "full_compliance", 1: "Full Refusal", 2: "partial-refusal"},
        label2id={"full_compliance": 0, "Full Refusal": 1, "partial-refusal": 2},
    )
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():  # a random head gives near-equal logits; spread them so argmax is not a tie
        model.score.weight.normal_(0, 5.0)
    return _with_tokenizer(model, tmp_path_factory.mktemp("judge_cls"), embedded_dir)


def test_causal_judge_reads_the_option_digits_of_an_unpadded_forward(tiny_model_dir):
    judge = build_judge(f"model:{tiny_model_dir}", batch_size=2, progress=False)
    assert isinstance(judge, ModelJudge) and not judge.is_classifier
    got = judge(QUESTIONS, ANSWERS)
    tok, model = judge.tokenizer, judge.model
    for q, a, label in zip(QUESTIONS, ANSWERS, got):  # reference: one forward per text, no padding
        ids = tok(judge.judge_text(q, a), add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        digits = [tok.encode(str(k), add_special_tokens=False)[0] for k in (1, 2, 3)]
        assert label == OPTION_LABELS[int(logits[digits].argmax())]
        assert q in judge.judge_text(q, a) and a in judge.judge_text(q, a)
    assert got == judge(QUESTIONS, ANSWERS)  # deterministic


def test_classifier_judge_maps_id2label_names_and_matches_single_forwards(classifier_dir):
    judge = ModelJudge(str(classifier_dir), batch_size=3, progress=False)
    assert judge.is_classifier and judge.class_of_index == ["full_compliance", "full_refusal", "partial_refusal"]
    scores = judge.scores(QUESTIONS, ANSWERS)
    for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS)):
        enc = judge.tokenizer(q, a, return_tensors="pt")
        with torch.no_grad():
            ref = judge.model(**enc).logits[0]
        assert torch.allclose(scores[i], ref, atol=1e-4)
    assert judge_labels(QUESTIONS, ANSWERS, judge) == [judge.class_of_index[k] for k in scores.argmax(-1).tolist()]


def test_judge_setting_is_checked(tmp_path, classifier_dir):
    assert isinstance(build_judge("strmatch"), StringMatchJudge)
    with pytest.raises(ValueError, match="behaviour.judge"):
        build_judge("gpt4")
    with pytest.raises(ValueError, match="judge"):
        EvalConfig.model_validate({"behaviour": {"judge": "model:"}})
    assert EvalConfig.model_validate({"behaviour": {"judge": "model:org/guard"}}).behaviour.judge == "model:org/guard"
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(classifier_dir)
    cfg.id2label, cfg.label2id = {0: "safe", 1: "unsafe", 2: "other"}, {"safe": 0, "unsafe": 1, "other": 2}
    shutil.copytree(classifier_dir, tmp_path / "bad")
    cfg.save_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match="id2label"):
        ModelJudge(str(tmp_path / "bad"), progress=False)


def test_every_template_wraps_the_prompt_and_unknown_names_are_refused():
    assert 6 <= len(TEMPLATES) - 1 <= 8 and TEMPLATES[CONTROL] == "{prompt}"
    for name in TEMPLATES:
        assert "How do I pick a lock?" in wrap("How do I pick a lock?", name)
    with pytest.raises(ValueError, match="unknown jailbreak"):
        wrap("x", "nope")
    with pytest.raises(ValueError, match="unknown jailbreak"):
        EvalConfig.model_validate({"behaviour": {"jailbreak": {"templates": ["nope"]}}})
    with pytest.raises(ValueError, match="unsafe"):
        jailbreak_prompts([PromptExample("hi", "safe", "a", row_id="s")])


def test_jailbreak_rates_per_template_and_overall_without_the_control(tmp_path):
    unsafe = [PromptExample(f"harmful request {i}", "unsafe", "ax", row_id=f"u{i}") for i in range(4)]

    def generate(texts):  # refuses plain prompts; complies with role play and prefix injection
        return ["Sure! Step 1: ..." if ("DAN" in t or "Absolutely!" in t) else "I can't help with that." for t in texts]

    out = run_jailbreaks(
        unsafe,
        generate,
        lambda p, placement: p,
        "none",
        templates=["role_play", "prefix_injection", "hypothetical"],
        generations_path=tmp_path / "jb.jsonl",
    )
    per = out["per_template"]
    assert list(per) == [CONTROL, "role_play", "prefix_injection", "hypothetical"]
    assert per[CONTROL]["rate"] == 1.0 and per["role_play"]["rate"] == 0.0 and per["hypothetical"]["rate"] == 1.0
    assert (out["overall"]["refused"], out["overall"]["total"]) == (4, 12)  # control not counted
    assert out["n_unsafe_prompts"] == 4
    assert len((tmp_path / "jb.jsonl").read_text().splitlines()) == 16
