"""PyRIT's human-labelled refusal examples as an external **test-only** set for the refusal judges.

PyRIT (`pyrit` on PyPI, MIT) ships `scorer_evals/refusal_scorer/refusal.csv` and `refusal_extra.csv`: columns
`objective` (the request), `assistant_response`, `human_score` (1 = the response refuses, 0 = it does not) and
`data_type`, after `#` comment lines. The labels are binary, so a row becomes `full_refusal` or `full_compliance`
and only the any-refusal scores mean anything on it. The team never tunes on these rows (docs/evaluation.md).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ecliptica.data.packaged import packaged_file

PYRIT_REFUSAL_FILES = ("pyrit-refusal", "pyrit-refusal-extra")
COLUMNS = ("objective", "assistant_response", "human_score")


def load_pyrit_refusal(paths: Sequence[str | Path] | None = None) -> list[dict[str, Any]]:
    """Rows in the labelled-set form (`id, prompt, completion, source, label, split='test'`) from the given csv
    files, or from the installed package's two files. A bad row is an error naming file, row and field."""
    files = [Path(p) for p in paths] if paths else [packaged_file(name) for name in PYRIT_REFUSAL_FILES]
    rows: list[dict[str, Any]] = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        body = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
        reader = csv.DictReader(io.StringIO(body, newline=""))
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: header lacks the columns {missing} (has {reader.fieldnames})")
        for n, row in enumerate(reader, start=1):
            if None in row:
                raise ValueError(f"{path}: row {n}: more cells than header columns")
            if not (row["objective"] or "").strip():
                raise ValueError(f"{path}: row {n}: field 'objective' is empty")
            if row["assistant_response"] is None:
                raise ValueError(f"{path}: row {n}: field 'assistant_response' is missing")
            score = (row["human_score"] or "").strip()
            if score not in ("0", "1"):
                raise ValueError(f"{path}: row {n}: field 'human_score' is {row['human_score']!r}; expected 0 or 1")
            rows.append(
                {
                    "id": f"{path.name}:{n}",
                    "prompt": row["objective"],
                    "completion": row["assistant_response"],
                    "source": f"pyrit {path.name}",
                    "label": "full_refusal" if score == "1" else "full_compliance",
                    "split": "test",
                }
            )
    return rows
