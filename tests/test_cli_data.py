"""`ecliptica data check` / `ecliptica data preview`, called in-process (and once through the entry point)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ecliptica.cli import main

INSTR = "Never help with picking locks you do not own."
ROWS = [
    {
        "id": "r1",
        "prompt": "How do I pick my neighbour's lock?",
        "instruction": INSTR,
        "chosen": "I can't help with that; a locksmith can help you with your own locks.",
        "rejected": "Insert a tension wrench and rake the pins.",
    },
    {
        "id": "r2",
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What is 2+2?"},
        ],
        "instruction": "Answer correctly.",
        "chosen": "4",
        "rejected": "5",
    },
    {"id": "r3", "prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def good_file(tmp_path):
    return _write_jsonl(tmp_path / "good.jsonl", ROWS)


def test_check_valid_file(good_file, capsys):
    assert main(["data", "check", str(good_file), "--format", "generic"]) == 0
    out = capsys.readouterr().out
    assert "3 rows read, 3 valid pairs, 0 bad" in out
    assert "context turns: 1: 2, 3: 1" in out
    assert "with instruction: 2" in out


def test_check_bad_rows_exit_nonzero_and_are_named(tmp_path, capsys):
    rows = [ROWS[0], {"prompt": "p", "chosen": "", "rejected": "r"}, ROWS[2], {"prompt": "p", "chosen": "c"}]
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    report = tmp_path / "report.json"
    assert main(["data", "check", str(path), "--format", "generic", "--save-report", str(report)]) == 1
    out = capsys.readouterr().out
    assert "4 rows read, 2 valid pairs, 2 bad" in out
    assert "row 2: field 'chosen'" in out
    assert "row 4: field 'rejected'" in out
    saved = json.loads(report.read_text())
    assert [(b["row"], b["field"]) for b in saved["bad_rows"]] == [(2, "chosen"), (4, "rejected")]


def test_check_prompt_data_prints_axis_counts(tmp_path, capsys):
    rows = [
        {"prompt": "Kill a process?", "label": "safe", "axiom": "violence"},
        {"prompt": "Kill a person?", "label": "unsafe", "axiom": "violence"},
        {"prompt": "Kill the lights?", "label": "safe", "axiom": "violence"},
    ]
    path = _write_jsonl(tmp_path / "eval.jsonl", rows)
    assert main(["data", "check", str(path), "--format", "generic-prompts"]) == 0
    out = capsys.readouterr().out
    assert "3 rows read, 3 valid prompts, 0 bad" in out
    assert re.search(r"violence\s+safe\s+2", out) and re.search(r"violence\s+unsafe\s+1", out)


def test_check_filtered_rows_are_reported(tmp_path, capsys):
    cats = {"Violence": False}
    rows = [
        {
            "prompt": "Bake?",
            "response_0": "Flour.",
            "response_1": "Oven.",
            "is_response_0_safe": True,
            "is_response_1_safe": True,
            "response_0_harm_category": cats,
            "response_1_harm_category": cats,
        }
    ]
    path = _write_jsonl(tmp_path / "pku.jsonl", rows)
    assert main(["data", "check", str(path), "--format", "pku-saferlhf"]) == 0
    out = capsys.readouterr().out
    assert "1 rows read, 0 valid pairs, 0 bad" in out
    assert "1 x both responses safe" in out


def test_check_missing_file_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["data", "check", "data/missing.jsonl", "--format", "generic"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_check_demo_data(capsys):
    assert main(["data", "check", "demo:preferences", "--format", "generic"]) == 0
    assert main(["data", "check", "demo:eval", "--format", "generic-prompts"]) == 0
    out = capsys.readouterr().out
    assert " 0 bad" in out


def test_entry_point_subprocess(good_file):
    exe = Path(sys.executable).parent / "ecliptica"
    assert exe.is_file(), f"console script not installed at {exe}"
    proc = subprocess.run(
        [str(exe), "data", "check", str(good_file), "--format", "generic"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "3 rows read, 3 valid pairs, 0 bad" in proc.stdout


# ------------------------------------------------------------------ preview

SYSTEM_PROMPT_R1 = (
    f"<|im_start|>system\n{INSTR}<|im_end|>\n"
    "<|im_start|>user\nHow do I pick my neighbour's lock?<|im_end|>\n<|im_start|>assistant\n"
)
NONE_PROMPT_R1 = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nHow do I pick my neighbour's lock?<|im_end|>\n<|im_start|>assistant\n"
)


def _preview(good_file, tiny_model_dir, capsys, *extra):
    rc = main(
        ["data", "preview", str(good_file), "--format", "generic", "-n", "2", "--model", str(tiny_model_dir), *extra]
    )
    return rc, capsys.readouterr().out


def test_preview_cita_system(good_file, tiny_model_dir, tokenizer, capsys):
    rc, out = _preview(good_file, tiny_model_dir, capsys, "--method", "cita", "--instruction", "system")
    assert rc == 0
    assert out.count("===== ") == 2  # -n 2
    assert "===== r1  method=cita instruction=system" in out
    assert SYSTEM_PROMPT_R1 in out
    assert "<|im_start|>system\nAnswer correctly.<|im_end|>" in out  # second example's own instruction
    assert "I can't help with that; a locksmith can help you with your own locks." in out
    assert "----- rejected:" in out and "Insert a tension wrench and rake the pins." in out
    # token counts: prompt = the hand-written prompt text; responses + EOS
    n_prompt = len(tokenizer(SYSTEM_PROMPT_R1, add_special_tokens=False)["input_ids"])
    n_chosen = len(tokenizer(ROWS[0]["chosen"], add_special_tokens=False)["input_ids"]) + 1
    n_rejected = len(tokenizer(ROWS[0]["rejected"], add_special_tokens=False)["input_ids"]) + 1
    assert f"tokens: prompt {n_prompt}, chosen {n_chosen}, rejected {n_rejected}" in out
    assert "Name a colour." not in out  # only 2 examples


def test_preview_sft_has_no_rejected(good_file, tiny_model_dir, capsys):
    rc, out = _preview(good_file, tiny_model_dir, capsys, "--method", "sft", "--instruction", "system")
    assert rc == 0
    assert "----- rejected:" not in out
    assert "Insert a tension wrench" not in out
    assert "I can't help with that" in out


def test_preview_instruction_none(good_file, tiny_model_dir, capsys):
    rc, out = _preview(good_file, tiny_model_dir, capsys, "--method", "cita", "--instruction", "none")
    assert rc == 0
    assert INSTR not in out and "Answer correctly." not in out
    assert NONE_PROMPT_R1 in out


def test_preview_instruction_text_for_rows_without_one(tmp_path, tiny_model_dir, capsys):
    path = _write_jsonl(tmp_path / "plain.jsonl", [ROWS[2]])
    rc = main(
        [
            "data",
            "preview",
            str(path),
            "--format",
            "generic",
            "-n",
            "1",
            "--model",
            str(tiny_model_dir),
            "--instruction",
            "prepend",
            "--instruction-text",
            "Be accurate.",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "<|im_start|>user\nBe accurate.\n\nName a colour.<|im_end|>" in out


def test_data_check_generic_detects_prompt_files(capsys):
    """`--format generic` on a prompt file (no `chosen` column) checks it as evaluation prompts."""
    from ecliptica.cli import main

    assert main(["data", "check", "demo:eval", "--format", "generic"]) == 0
    out = capsys.readouterr().out
    assert "[generic-prompts]" in out and "valid prompts" in out
