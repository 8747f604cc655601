"""Writers: results.md (table, optional sections, questions), results.csv (the table) and results.json.

Optional sections: a function ``(by_arm) -> list[str] | None`` (Markdown lines, or None when the
records have nothing for it) added to ``SECTIONS`` is rendered between the table and the research
questions, e.g. a calibration section once the records carry a calibration sweep.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..runio import atomic_write_text
from .questions import num, p_text
from .records import BASELINE
from .table import CSV_COLUMNS

Section = Callable[[Mapping[str, Mapping[int, dict]]], "list[str] | None"]
SECTIONS: list[Section] = []


def optional_sections(by_arm: Mapping[str, Mapping[int, dict]], sections: Sequence[Section] = ()) -> list[str]:
    """Markdown lines of every section that has something to show (``SECTIONS`` + ``sections``)."""
    lines: list[str] = []
    for section in [*SECTIONS, *sections]:
        body = section(by_arm)
        if body:
            lines += [*body, ""]
    return lines


def _md_cell(row: Mapping[str, Any], key: str, digits: int = 3) -> str:
    value, low, high, sd = row.get(key), row.get(f"{key}_low"), row.get(f"{key}_high"), row.get(f"{key}_sd")
    if value is None:
        return "n/a"
    text = num(value, digits)
    if sd is not None:
        text += f" ± {num(sd, digits)}"
    if low is not None and high is not None:
        text += f" [{num(low, digits)}, {num(high, digits)}]"
    return text


def _md_delta(row: Mapping[str, Any]) -> str:
    if row["delta_aqi"] is None:
        return "—" if row["arm"] == BASELINE else "n/a"
    mark = "*" if row["delta_aqi_significant"] else ""
    return (
        f"{num(row['delta_aqi'], signed=True)}{mark} [{num(row['delta_aqi_low'], signed=True)}, "
        f"{num(row['delta_aqi_high'], signed=True)}] p={p_text(row['delta_aqi_p'])}"
    )


def _md_efficiency(row: Mapping[str, Any]) -> str:
    if row["efficiency"] is None:
        return "—" if row["arm"] == BASELINE else "n/a"
    if row["compute_device"] == "CPU":
        return f"n/a (CPU); {num(row['efficiency'], signed=True)} per CPU-h"
    return num(row["efficiency"], signed=True)


def md_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    header = [
        "arm",
        "seeds",
        "prompt-repr. AQI",
        "ΔAQI vs baseline",
        "completion AQI (lexical)",
        "refusal (unsafe)",
        "over-refusal (safe)",
        "benign ppl",
        "collapsed",
        "train min",
        "peak VRAM GiB",
        "tokens/s",
        "ΔAQI / GPU-h",
        "overrides",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r["arm"],
            str(r["n_seeds"]),
            _md_cell(r, "aqi"),
            _md_delta(r),
            f"{_md_cell(r, 'aqi_completion')} ({num(r.get('aqi_completion_lexical'))})",
            _md_cell(r, "refusal_rate_unsafe"),
            _md_cell(r, "over_refusal_rate_safe"),
            num(r["perplexity"], 2),
            r["collapsed"] or "n/a",
            num(r["train_minutes"], 1) if r["train_minutes"] is not None else "—",
            ("n/a (CPU)" if r["compute_device"] == "CPU" else num(r["peak_vram_gib"], 2))
            if r["compute_device"]
            else "—",
            num(r["tokens_per_s"], 0) if r["tokens_per_s"] is not None else "—",
            _md_efficiency(r),
            r["overrides"] or "—",
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def render_markdown(rows, questions, settings, notes, sections: Sequence[str] = ()) -> str:
    alpha = settings["alpha"]
    lines = [
        "# Ecliptica study results",
        "",
        f"{settings['n_prompts'] or 'n/a'} prompts · {settings['n_resamples']} bootstrap resamples · "
        f"α = {alpha:g} · seed {settings['seed']}",
        "",
        *md_table(rows),
        "",
        f"Cells: mean [{1 - alpha:.0%} CI]; with several seeds mean ± sd over seeds [two-stage bootstrap: seeds, "
        "then prompts, as in the research questions; AQI without embeddings and probe AUROC: t-interval over "
        "seeds]; with one seed the run's own CI over prompts. AQI is the evaluation's recorded value: the "
        "prompt-representation AQI (`aqi` = `aqi_prompt`, pooled over the prompt's own tokens); completion AQI: the "
        "behaviour AQI of the model's own judged completions, its layer-0 (words-only) control in brackets "
        "(docs/aqi.md). ΔAQI: paired "
        "bootstrap on the same prompts (each run's recorded AQI settings); * = CI excludes 0, per comparison "
        "and not corrected for multiplicity (the research questions below are). Compute-hours = "
        "train_seconds × num_processes / device_shared_by / 3600; CPU runs are labelled and their rate is per "
        "CPU-hour. Overrides are the per-arm config changes.",
        "",
    ]
    if notes:
        lines += ["Notes:", *[f"- {n}" for n in notes], ""]
    lines += list(sections)
    lines += [
        "## Research questions",
        "",
        f"Within each question p-values are Holm-adjusted; a difference is claimed when the adjusted p < "
        f"{alpha:g}, no difference only when the whole CI lies within ± the minimum effect of interest "
        f"({settings['min_effect_text']}), otherwise the answer is inconclusive.",
        "",
    ]
    for q in questions.values():
        lines += [f"### {q['question']}", "", f"Status: {q['status']}.", ""]
        lines += [f"- {f['text']}" for f in q["findings"]]
        lines += [""] + [f"_{n}_" for n in q["notes"]] + [""]
    return "\n".join(lines)


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    f = io.StringIO(newline="")
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_COLUMNS})
    atomic_write_text(path, f.getvalue())  # a reader never sees half a table


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
