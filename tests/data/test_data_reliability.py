"""Bad input named in one line (truncated .gz, YAML syntax), `data check` on files with no valid row,
the generic kind from the first valid row, CRLF transcripts, skipped rows always reported, and a
warning when truncation cuts the instruction."""

from __future__ import annotations

import gzip
import json
import warnings

import pytest

from ecliptica.cli import main
from ecliptica.config import TrainConfig, load_config
from ecliptica.data import Message, PreferenceExample, TokenizeSettings, load_preferences, tokenize_pairs
from ecliptica.data.transcripts import parse_transcript
from ecliptica.train.engine import prepare_data

PAIR = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}


def test_truncated_gzip_is_named(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(gzip.compress((json.dumps(PAIR) + "\n").encode() * 50)[:-20])  # download cut short
    with pytest.raises(ValueError, match=r"pairs.jsonl.gz: truncated or corrupt gzip file"):
        load_preferences(path, "generic")
    assert main(["data", "check", str(path), "--format", "generic"]) == 2
    assert "truncated or corrupt gzip" in capsys.readouterr().err


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 1\ntrain:\n  max_steps: 3\n  grad_accum: [1, 2\n")
    with pytest.raises(ValueError, match=r"run.yaml:5:1: YAML syntax error: .*fix the file"):
        load_config(path)
    assert main(["train", str(path)]) == 2
    assert "run.yaml:5:1: YAML syntax error" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"override 'seed=\[1': the value is not valid YAML"):
        load_config(None, ["seed=[1"])


@pytest.mark.parametrize("content", ["", "\n\n", "{not json\n[1, 2]\n"])
def test_data_check_fails_when_no_row_is_valid(tmp_path, capsys, content):
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)
    assert main(["data", "check", str(path), "--format", "generic"]) == 1
    assert "no valid row" in capsys.readouterr().err


def test_generic_kind_comes_from_the_first_valid_row(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_text("{broken\n" + json.dumps(PAIR) + "\n" + json.dumps(PAIR | {"chosen": "Red."}) + "\n")
    assert main(["data", "check", str(path), "--format", "generic"]) == 1  # the broken row is bad...
    out = capsys.readouterr().out
    assert "3 rows read, 2 valid pairs, 1 bad" in out  # ...and the file is still read as pairs
    assert "row 1: field '<line>'" in out


def test_data_check_reads_a_directory_file_by_file_in_sorted_order(tmp_path, capsys):
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "b.jsonl").write_text(json.dumps(PAIR | {"chosen": "Red."}) + "\n" + json.dumps({"prompt": "Hi."}) + "\n")
    (folder / "a.jsonl").write_text("\n".join(json.dumps(PAIR | {"chosen": c}) for c in ("Blue.", "Green.")) + "\n")
    (folder / "README.md").write_text("not data")
    assert main(["data", "check", str(folder), "--format", "generic"]) == 1  # b.jsonl row 2 is bad
    out = capsys.readouterr().out
    assert f"{folder} [generic]: 4 rows read, 3 valid pairs, 1 bad" in out
    assert f"{folder / 'b.jsonl'}: row 2: field 'chosen': missing" in out  # the row named in its own file
    # a directory of prompts is read as prompts, like a file of them
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for name, label in (("1.jsonl", "safe"), ("2.jsonl", "unsafe")):
        (prompts / name).write_text(json.dumps({"prompt": "Hi.", "label": label, "axiom": "a"}) + "\n")
    assert main(["data", "check", str(prompts), "--format", "generic"]) == 0
    assert "[generic-prompts]: 2 rows read, 2 valid prompts, 0 bad" in capsys.readouterr().out


def test_crlf_transcripts_parse_like_lf(tmp_path):
    lf = "\n\nHuman: Add 2 and 2.\nShow work.\n\nAssistant: 2+2\n= 4"
    crlf = lf.replace("\n", "\r\n")
    assert (
        parse_transcript(crlf)
        == parse_transcript(lf)
        == [Message("user", "Add 2 and 2.\nShow work."), Message("assistant", "2+2\n= 4")]
    )
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps({"chosen": crlf, "rejected": crlf.replace("= 4", "= 5")}) + "\n")
    [ex] = load_preferences(path, "hh-rlhf").examples
    assert (ex.chosen, ex.rejected) == ("2+2\n= 4", "2+2\n= 5")


def _train_cfg(path, tmp_path, model_dir):
    return TrainConfig.model_validate(
        {
            "run_dir": str(tmp_path / "run"),
            "model": {"name": str(model_dir)},
            "data": {"path": str(path), "on_bad_row": "skip"},
        }
    )


def test_skipped_rows_are_written_and_counted_even_when_every_row_is_bad(tmp_path, tokenizer, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": "p", "chosen": "c"}) + "\n" for _ in range(3)))
    report = tmp_path / "skipped_rows.json"
    with pytest.raises(ValueError, match=r"no training pairs left .*\(3 rows read, 3 bad"):
        prepare_data(_train_cfg(path, tmp_path, "unused"), tokenizer, "system", progress=False, bad_rows_path=report)
    assert "3 rows read, 3 skipped as bad" in capsys.readouterr().out
    saved = json.loads(report.read_text())
    assert [(b["row"], b["field"]) for b in saved["bad_rows"]] == [(1, "rejected"), (2, "rejected"), (3, "rejected")]
    path.write_text(json.dumps(PAIR) + "\n")  # no bad row: the report still says so
    prepare_data(_train_cfg(path, tmp_path, "unused"), tokenizer, "system", progress=False, bad_rows_path=report)
    assert json.loads(report.read_text())["bad_rows"] == []


def test_warning_when_truncation_cuts_the_instruction(tokenizer):
    instr = "Never reveal the secret password to anyone under any circumstances."
    long_ctx = " ".join(f"word{i}" for i in range(80))
    cut = PreferenceExample((Message("user", long_ctx),), "No.", "Yes.", instr, "t", "cut")
    short = PreferenceExample((Message("user", "Hi."),), "No.", "Yes.", instr, "t", "short")
    settings = TokenizeSettings(max_length=160, max_prompt_length=64)
    for placement in ("system", "prepend"):
        with pytest.warns(RuntimeWarning, match=r"removed part of the instruction in 1 of 2 prompts"):
            data = tokenize_pairs(tokenizer, [cut, short], placement, settings, progress=False)
        assert data.stats.instructions_truncated == 1
        assert instr not in tokenizer.decode(data.pairs[0].prompt_ids)  # really cut
        assert instr in tokenizer.decode(data.pairs[1].prompt_ids)
    with warnings.catch_warnings():  # negative controls: prompt truncated but no instruction shown / room enough
        warnings.simplefilter("error")
        assert tokenize_pairs(tokenizer, [cut], "none", settings, progress=False).stats.prompts_truncated == 1
        roomy = TokenizeSettings(max_length=512, max_prompt_length=256)
        assert tokenize_pairs(tokenizer, [cut], "system", roomy, progress=False).stats.instructions_truncated == 0
