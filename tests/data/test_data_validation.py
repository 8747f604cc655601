"""Readers and row validation: every file type, every kind of bad row named by file, row and field."""

from __future__ import annotations

import json

import pytest

from ecliptica.data import BadRow, DataError, LoadOptions, Message, load, load_preferences, load_prompts, save_bad_rows
from ecliptica.data.readers import iter_rows

GOOD = [
    {
        "id": "a",
        "prompt": "How do I boil an egg?",
        "chosen": "Simmer it for nine minutes.",
        "rejected": "Microwave it whole.",
    },
    {"id": "b", "prompt": "Name a prime number.", "chosen": "Seven.", "rejected": "Nine."},
]


def _accounting(loaded) -> None:
    r = loaded.report
    assert r.rows_read == r.kept + len(r.bad_rows) + sum(loaded.filtered.values())
    assert r.kept == len(loaded.examples)


@pytest.mark.parametrize(
    "name", ["p.jsonl", "p.json", "p.csv", "p.parquet", "p.jsonl.gz", "p.json.gz", "p.csv.gz", "p.parquet.gz"]
)
def test_every_file_type_reads_the_same_examples(write, name):
    path = write(name, GOOD)
    loaded = load_preferences(path, "generic")
    assert [(e.row_id, e.messages, e.chosen, e.rejected) for e in loaded.examples] == [
        ("a", (Message("user", "How do I boil an egg?"),), "Simmer it for nine minutes.", "Microwave it whole."),
        ("b", (Message("user", "Name a prime number."),), "Seven.", "Nine."),
    ]
    assert loaded.report.rows_read == 2 and loaded.report.kept == 2 and loaded.report.bad_rows == []
    assert all(e.source == name for e in loaded.examples)


def test_json_object_holding_one_list(tmp_path):
    p = tmp_path / "wrapped.json"
    p.write_text(json.dumps({"meta": "x", "data": GOOD}))
    assert [e.chosen for e in load(p, "generic").examples] == ["Simmer it for nine minutes.", "Seven."]


def test_rows_are_numbered_from_one_and_blank_jsonl_lines_keep_numbering(tmp_path):
    p = tmp_path / "blank.jsonl"
    p.write_text(json.dumps(GOOD[0]) + "\n\n" + json.dumps(GOOD[1]) + "\n")
    rows = list(iter_rows(p))
    assert [n for n, _ in rows] == [1, 3]  # line 2 is blank; row 3 is the third line


def _bad_jsonl(tmp_path):
    """Ten lines; expected bad (row, field) pairs are written out by hand below."""
    ok = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}
    lines = [
        json.dumps(ok).encode(),  # 1 good
        json.dumps({"prompt": "p", "rejected": "r"}).encode(),  # 2 chosen missing
        json.dumps({"prompt": "p", "chosen": "", "rejected": "r"}).encode(),  # 3 chosen empty
        json.dumps({"prompt": "p", "chosen": "c", "rejected": 42}).encode(),  # 4 rejected is a number
        json.dumps({"prompt": "p", "chosen": "same", "rejected": " same "}).encode(),  # 5 identical
        json.dumps(
            {
                "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                "chosen": "c",
                "rejected": "r",
            }
        ).encode(),  # 6 not alternating
        b'{"prompt": "p", "chosen": "c", ',  # 7 invalid JSON
        b'{"prompt": "p", "chosen": "caf\xe9 \xff", "rejected": "r"}',  # 8 invalid UTF-8 bytes
        json.dumps({"messages": [{"role": "user", "content": "  "}], "chosen": "c", "rejected": "r"}).encode(),  # 9
        json.dumps({**ok, "chosen": "Hello!"}).encode(),  # 10 good
    ]
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


EXPECTED_BAD = [
    (2, "chosen", "missing"),
    (3, "chosen", "empty"),
    (4, "rejected", "string"),
    (5, "rejected", "identical"),
    (6, "messages", "alternate"),
    (7, "<line>", "invalid JSON"),
    (8, "chosen", "undecodable"),
    (9, "messages", "non-empty"),
]


def test_bad_rows_named_by_file_row_field_and_reason(tmp_path):
    p = _bad_jsonl(tmp_path)
    loaded = load(p, "generic", on_bad_row="skip")
    got = [(b.row, b.field) for b in loaded.report.bad_rows]
    assert got == [(r, f) for r, f, _ in EXPECTED_BAD]
    for b, (_, _, word) in zip(loaded.report.bad_rows, EXPECTED_BAD):
        assert b.file == str(p)
        assert word in b.reason
    assert [e.chosen for e in loaded.examples] == ["Hi!", "Hello!"]
    assert [e.row_id for e in loaded.examples] == ["bad.jsonl:1", "bad.jsonl:10"]
    assert loaded.report.rows_read == 10
    _accounting(loaded)


def test_on_bad_row_error_raises_listing_every_bad_row(tmp_path):
    p = _bad_jsonl(tmp_path)
    with pytest.raises(DataError) as ei:
        load(p, "generic")  # default is 'error'
    assert [(b.row, b.field) for b in ei.value.bad_rows] == [(r, f) for r, f, _ in EXPECTED_BAD]
    msg = str(ei.value)
    assert msg.startswith("8 bad row(s)")
    for r, f, _ in EXPECTED_BAD:
        assert f"row {r}: field '{f}'" in msg


def test_save_bad_rows_writes_reasons(tmp_path):
    loaded = load(_bad_jsonl(tmp_path), "generic", on_bad_row="skip")
    out = tmp_path / "report.json"
    save_bad_rows(loaded, out)
    data = json.loads(out.read_text())
    assert data["rows_read"] == 10 and data["kept"] == 2 and data["format"] == "generic"
    assert [(b["row"], b["field"]) for b in data["bad_rows"]] == [(r, f) for r, f, _ in EXPECTED_BAD]
    assert all(b["reason"] for b in data["bad_rows"])


def test_on_bad_row_rejects_unknown_policy(write):
    with pytest.raises(ValueError, match="on_bad_row"):
        load(write("g.jsonl", GOOD), "generic", on_bad_row="ignore")


def test_csv_invalid_utf8_cell_and_extra_cells(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_bytes(
        b"prompt,chosen,rejected\nSay hi.,Hi!,No.\nSay bye.,Bye!,\xff\xfe nope\na,b,c,d\nCount.,One two.,Three.\n"
    )
    loaded = load(p, "generic", on_bad_row="skip")
    assert [(b.file, b.row, b.field) for b in loaded.report.bad_rows] == [(str(p), 2, "rejected"), (str(p), 3, "<row>")]
    assert "UTF-8" in loaded.report.bad_rows[0].reason
    assert [e.chosen for e in loaded.examples] == ["Hi!", "One two."]
    _accounting(loaded)


def test_csv_with_byte_order_mark(tmp_path):
    # Excel writes a BOM; it must not turn the first column into '\ufeffprompt'.
    p = tmp_path / "bom.csv"
    p.write_bytes("\ufeffprompt,chosen,rejected\nSay hi.,Hi!,No.\n".encode("utf-8"))
    assert [e.messages for e in load(p, "generic").examples] == [(Message("user", "Say hi."),)]


def test_jsonl_strings_with_unicode_line_separators(tmp_path):
    # U+2028 / U+0085 are legal raw inside JSON strings; they must not split a jsonl row.
    p = tmp_path / "sep.jsonl"
    row = {"prompt": "first\u2028second\x85third", "chosen": "Yes.", "rejected": "No."}
    p.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    loaded = load(p, "generic")
    assert loaded.report.rows_read == 1
    assert loaded.examples[0].messages == (Message("user", "first\u2028second\x85third"),)


def test_non_object_json_line(tmp_path):
    p = tmp_path / "list.jsonl"
    p.write_text(json.dumps(GOOD[0]) + "\n[1, 2]\n")
    loaded = load(p, "generic", on_bad_row="skip")
    assert [(b.row, b.field) for b in loaded.report.bad_rows] == [(2, "<line>")]


def test_message_list_validation(write):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"},
            ],
            "chosen": "Goodbye.",
            "rejected": "Whatever.",
        },  # 1 ok
        {"messages": [{"role": "user", "text": "Hi"}], "chosen": "c", "rejected": "r"},  # 2 no content
        {"messages": [{"role": "bot", "content": "Hi"}], "chosen": "c", "rejected": "r"},  # 3 bad role
        {
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
            "chosen": "c",
            "rejected": "r",
        },  # 4 ends w/ assistant
        {"messages": [], "chosen": "c", "rejected": "r"},  # 5 empty list
        {"messages": [{"role": "system", "content": "x"}], "chosen": "c", "rejected": "r"},  # 6 no user turn
    ]
    loaded = load(write("m.jsonl", rows), "generic", on_bad_row="skip")
    assert [(b.row, b.field) for b in loaded.report.bad_rows] == [(k, "messages") for k in (2, 3, 4, 5, 6)]
    assert "role" in loaded.report.bad_rows[0].reason and "content" in loaded.report.bad_rows[0].reason
    assert loaded.examples[0].messages == (
        Message("system", "Be brief."),
        Message("user", "Hi"),
        Message("assistant", "Hello"),
        Message("user", "Bye"),
    )


def test_csv_prompt_holding_a_json_message_list_and_text_starting_with_bracket(write):
    rows = [
        {
            "prompt": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Tell a joke."},
            ],
            "chosen": "Knock knock.",
            "rejected": "No.",
        },
        {"prompt": "[Scene: a quiet bar] Write the opening line.", "chosen": "The ice clinked.", "rejected": "No."},
        {"prompt": '[{"role": "user", "content": "broken"', "chosen": "c", "rejected": "r"},
    ]
    loaded = load(write("m.csv", rows), "generic", on_bad_row="skip")
    assert loaded.examples[0].messages == (
        Message("user", "Hi"),
        Message("assistant", "Hello"),
        Message("user", "Tell a joke."),
    )
    assert loaded.examples[1].messages == (Message("user", "[Scene: a quiet bar] Write the opening line."),)
    assert [(b.row, b.field) for b in loaded.report.bad_rows] == [(3, "prompt")]


def test_null_id_in_parquet_gets_file_row_id(write):
    rows = [{**GOOD[0], "id": None}, {**GOOD[1], "id": "kept-id"}]
    loaded = load(write("ids.parquet", rows), "generic")
    assert [e.row_id for e in loaded.examples] == ["ids.parquet:1", "kept-id"]


def test_missing_local_file_is_not_treated_as_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load("data/missing.jsonl", "generic")


def test_unsupported_suffix_and_unknown_format(tmp_path, write):
    p = tmp_path / "x.txt"
    p.write_text("hello")
    with pytest.raises(ValueError, match="unsupported file type"):
        load(p, "generic")
    with pytest.raises(ValueError, match="unknown data format"):
        load(write("g.jsonl", GOOD), "no-such-format")


def test_kind_mismatch_is_refused(write):
    path = write("g.jsonl", GOOD)
    with pytest.raises(ValueError, match="preference data"):
        load_prompts(path, "hh-rlhf")


def test_limit_and_source_name(write):
    path = write("g.jsonl", GOOD)
    loaded = load(path, "generic", limit=1, options=LoadOptions(source_name="mine"))
    assert len(loaded.examples) == 1 and loaded.examples[0].source == "mine"
    assert loaded.examples[0].row_id == "a"


def test_bad_row_str():
    assert str(BadRow("f.jsonl", 3, "chosen", "is empty")) == "f.jsonl: row 3: field 'chosen': is empty"
