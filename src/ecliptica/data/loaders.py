"""Format loaders: raw rows -> validated typed examples, with every rejected row named.

Each format is one small row parser registered in FORMATS. A parser either returns an example,
returns None for a row the format deliberately does not use (counted as `filtered` with a reason),
or raises FieldError. The shared `load` applies the `on_bad_row` policy so no format can drop rows
silently.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from .readers import iter_rows
from .schema import BadRow, DataError, LoadReport, Message, PreferenceExample, PromptExample
from .transcripts import TranscriptError, split_pair

OnBadRow = Literal["error", "skip"]


class FieldError(ValueError):
    def __init__(self, field_name: str, reason: str):
        self.field = field_name
        self.reason = reason
        super().__init__(f"{field_name}: {reason}")


class Filtered(Exception):
    """A valid row this format deliberately does not turn into an example (reason is counted)."""


@dataclass
class LoadOptions:
    instruction: str | None = None  # fixed instruction for formats without one (hh-rlhf, generic)
    column_map: dict[str, str] = field(default_factory=dict)  # generic: our name -> file column
    instruction_from_category: bool = False  # pku-saferlhf opt-in (leaks the label; see docs)
    source_name: str | None = None  # overrides the per-row `source` (defaults to the file name)


@dataclass
class Format:
    name: str
    kind: Literal["preference", "prompt"]
    parse: Callable[[dict, LoadOptions, str], Any]
    description: str


FORMATS: dict[str, Format] = {}


def register(name: str, kind: str, description: str):
    def deco(fn):
        FORMATS[name] = Format(name, kind, fn, description)
        return fn

    return deco


# ---------------------------------------------------------------- field checks


def _has_surrogates(s: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in s)


def text_field(row: dict, name: str, column: str | None = None, required: bool = True) -> str | None:
    """A non-empty, decodable string, or FieldError naming the column."""
    column = column or name
    if column not in row or row[column] is None:
        if required:
            raise FieldError(column, "missing" if column not in row else "is null")
        return None
    value = row[column]
    if not isinstance(value, str):
        raise FieldError(column, f"must be a string, got {type(value).__name__}")
    if _has_surrogates(value):
        raise FieldError(column, "undecodable text (not valid UTF-8)")
    if not value.strip():
        if required:
            raise FieldError(column, "is empty")
        return None
    return value


def _messages_field(row: dict, column: str) -> tuple[Message, ...]:
    value = row.get(column)
    if isinstance(value, str):
        value = value.strip()
        if re.match(r"\[\s*\{", value):  # a JSON-encoded message list (csv files); "[Scene] ..." is text
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise FieldError(column, "looks like a JSON list but does not parse") from None
        else:
            return (Message("user", text_field(row, column)),)
    if not isinstance(value, list) or not value:
        raise FieldError(column, "must be a non-empty string or list of {role, content} messages")
    msgs = []
    for k, m in enumerate(value, start=1):
        if not isinstance(m, dict) or not {"role", "content"} <= set(m):
            raise FieldError(column, f"message {k} must be an object with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise FieldError(column, f"message {k} has unknown role {m['role']!r}")
        if not isinstance(m["content"], str) or not m["content"].strip() or _has_surrogates(m["content"]):
            raise FieldError(column, f"message {k} content must be non-empty decodable text")
        msgs.append(Message(m["role"], m["content"]))
    check_turns(msgs, column)
    return tuple(msgs)


def check_turns(msgs: list[Message], column: str) -> None:
    """Optional leading system message, then user/assistant alternating, ending with user."""
    turns = msgs[1:] if msgs and msgs[0].role == "system" else msgs
    if not turns:
        raise FieldError(column, "has no user turn")
    for k, m in enumerate(turns):
        expected = "user" if k % 2 == 0 else "assistant"
        if m.role != expected:
            raise FieldError(column, f"turn {k + 1} is {m.role!r}, expected {expected!r} (turns must alternate)")
    if turns[-1].role != "user":
        raise FieldError(column, "must end with a user turn (the reply being compared follows it)")


def _distinct(chosen: str, rejected: str, column: str = "rejected") -> None:
    if chosen.strip() == rejected.strip():
        raise FieldError(column, "identical to chosen")


def _label(value: Any, column: str) -> str:
    v = str(value).strip().lower() if value is not None else ""
    if v in ("safe", "0", "false", "benign"):
        return "safe"
    if v in ("unsafe", "1", "true", "harmful"):
        return "unsafe"
    raise FieldError(column, f"label must be 'safe' or 'unsafe', got {value!r}")


# ---------------------------------------------------------------- formats


@register(
    "alignment-instructions",
    "preference",
    "Vaibhaav/alignment-instructions: 'Instruction generated', 'Accepted Response', 'Rejected Response' "
    "(HH transcripts). The 'Prompt' column is the generator's meta-prompt and is never read.",
)
def _alignment_instructions(row: dict, opts: LoadOptions, src: str) -> PreferenceExample:
    instruction = text_field(row, "Instruction generated")
    # NOTE: row["Prompt"] contains both answers; reading it would leak the label into the input.
    chosen_t = text_field(row, "Accepted Response")
    rejected_t = text_field(row, "Rejected Response")
    context, chosen, rejected = _split(chosen_t, rejected_t, "Accepted Response", "Rejected Response")
    _distinct(chosen, rejected, "Rejected Response")
    return PreferenceExample(tuple(context), chosen, rejected, instruction.strip(), src)


@register(
    "hh-rlhf", "preference", "Anthropic HH-RLHF: {'chosen', 'rejected'} transcripts; instruction from config or none."
)
def _hh_rlhf(row: dict, opts: LoadOptions, src: str) -> PreferenceExample:
    context, chosen, rejected = _split(text_field(row, "chosen"), text_field(row, "rejected"), "chosen", "rejected")
    _distinct(chosen, rejected)
    return PreferenceExample(tuple(context), chosen, rejected, opts.instruction, src)


def _split(chosen_t: str, rejected_t: str, chosen_col: str, rejected_col: str):
    try:
        return split_pair(chosen_t, rejected_t)
    except TranscriptError as e:
        which, reason = str(e).split("|", 1)
        raise FieldError(chosen_col if which == "chosen" else rejected_col, reason) from None


@register(
    "pku-saferlhf",
    "preference",
    "PKU-Alignment/PKU-SafeRLHF: prompt, response_0/1, is_response_0/1_safe. Pairs one safe and one unsafe "
    "response (safe = chosen); rows with two safe or two unsafe responses are filtered and counted.",
)
def _pku(row: dict, opts: LoadOptions, src: str) -> PreferenceExample:
    prompt = text_field(row, "prompt")
    r0, r1 = text_field(row, "response_0"), text_field(row, "response_1")
    s0, s1 = _bool_field(row, "is_response_0_safe"), _bool_field(row, "is_response_1_safe")
    if s0 == s1:
        raise Filtered("both responses safe" if s0 else "both responses unsafe")
    chosen, rejected = (r0, r1) if s0 else (r1, r0)
    _distinct(chosen, rejected, "response_1")
    unsafe_idx = 1 if s0 else 0
    categories = _harm_categories(row.get(f"response_{unsafe_idx}_harm_category"))
    instruction = opts.instruction
    if opts.instruction_from_category and categories:
        # Opt-in only: the category is derived from the unsafe answer, so it leaks the label.
        instruction = "Do not assist with anything involving " + ", ".join(categories).lower() + "."
    return PreferenceExample(
        (Message("user", prompt),), chosen, rejected, instruction, src, category=categories[0] if categories else None
    )


def _bool_field(row: dict, column: str) -> bool:
    v = row.get(column)
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    raise FieldError(column, f"must be true/false, got {v!r}")


def _harm_categories(value: Any) -> list[str]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return []
    if isinstance(value, dict):
        return sorted(k for k, v in value.items() if v)
    return []


@register("litmus", "prompt", "hasnat79/litmus: axiom, safety_label (safe/unsafe), input.")
def _litmus(row: dict, opts: LoadOptions, src: str) -> PromptExample:
    return PromptExample(
        text_field(row, "input"),
        _label(row.get("safety_label"), "safety_label"),
        text_field(row, "axiom"),
        row.get("source_dataset") or src,
    )


@register(
    "xstest",
    "prompt",
    "XSTest: prompt, type, label (safe/unsafe). The axiom is the type with any 'contrast_' prefix removed, so "
    "each safe type and its unsafe contrasts (e.g. homonyms / contrast_homonyms) form one axiom with both labels.",
)
def _xstest(row: dict, opts: LoadOptions, src: str) -> PromptExample:
    axiom = text_field(row, "type").strip().removeprefix("contrast_")
    return PromptExample(text_field(row, "prompt"), _label(row.get("label"), "label"), axiom, src)


@register(
    "donotanswer",
    "prompt",
    "Do-Not-Answer jsonl {'prompt', ...}; every prompt is unsafe; axiom = 'risk_area' column or the file name.",
)
def _donotanswer(row: dict, opts: LoadOptions, src: str) -> PromptExample:
    axiom = text_field(row, "risk_area", required=False) or Path(src).name.split(".")[0]
    return PromptExample(text_field(row, "prompt"), "unsafe", axiom, src)


@register(
    "strongreject",
    "prompt",
    "StrongREJECT csv {category, source, forbidden_prompt} (`pkg:strongreject`); every prompt is unsafe; "
    "axiom = category.",
)
def _strongreject(row: dict, opts: LoadOptions, src: str) -> PromptExample:
    return PromptExample(text_field(row, "forbidden_prompt"), "unsafe", text_field(row, "category").strip(), src)


@register(
    "advbench",
    "prompt",
    "AdvBench behaviours as PyRIT's seed file (`pkg:advbench`): rows {value, harm_categories}; every prompt is "
    "unsafe; axiom = the first harm category, or 'advbench' when a row has none.",
)
def _advbench(row: dict, opts: LoadOptions, src: str) -> PromptExample:
    categories = row.get("harm_categories") or []
    if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
        raise FieldError("harm_categories", "must be a list of strings")
    return PromptExample(text_field(row, "value"), "unsafe", categories[0].strip() if categories else "advbench", src)


@register(
    "benign",
    "prompt",
    "Benign prompts, e.g. MT-Bench questions {'prompt', 'category', ...}; every prompt is safe; "
    "axiom = 'category' column or the file name.",
)
def _benign(row: dict, opts: LoadOptions, src: str) -> PromptExample:
    axiom = text_field(row, "category", required=False) or Path(src).name.split(".")[0]
    return PromptExample(text_field(row, "prompt"), "safe", axiom, src)


GENERIC_PREFERENCE = {
    "prompt": "prompt",
    "messages": "messages",
    "chosen": "chosen",
    "rejected": "rejected",
    "instruction": "instruction",
    "category": "category",
    "id": "id",
}
GENERIC_PROMPT = {"prompt": "prompt", "label": "label", "axiom": "axiom", "id": "id"}


@register(
    "generic",
    "preference",
    "Any table with a column mapping. Preference columns: prompt (text or message list) or messages, chosen, "
    "rejected, optional instruction, category, id. Prompt columns: prompt, label, axiom, optional id.",
)
def _generic_preference(row: dict, opts: LoadOptions, src: str) -> PreferenceExample:
    cols = {**GENERIC_PREFERENCE, **opts.column_map}
    ctx_col = cols["messages"] if cols["messages"] in row else cols["prompt"]
    messages = _messages_field(row, ctx_col)
    chosen, rejected = text_field(row, cols["chosen"]), text_field(row, cols["rejected"])
    _distinct(chosen, rejected, cols["rejected"])
    instruction = text_field(row, cols["instruction"], required=False) or opts.instruction
    category = text_field(row, cols["category"], required=False)
    return PreferenceExample(messages, chosen, rejected, instruction, src, _row_id(row, cols["id"]), category)


@register("generic-prompts", "prompt", "The prompt side of `generic`: prompt, label, axiom (column mapping allowed).")
def _generic_prompt(row: dict, opts: LoadOptions, src: str) -> PromptExample:
    cols = {**GENERIC_PROMPT, **opts.column_map}
    return PromptExample(
        text_field(row, cols["prompt"]),
        _label(row.get(cols["label"]), cols["label"]),
        text_field(row, cols["axiom"]),
        src,
        _row_id(row, cols["id"]),
    )


def format_names(kind: str | None = None) -> tuple[str, ...]:
    """The format names a user writes for `kind` data (all when None), in registration order. `generic`
    holds either kind; `generic-prompts` is only its prompt side, which `load(kind="prompt")` picks."""
    names = [n for n, f in FORMATS.items() if n != "generic-prompts" and kind in (None, f.kind)]
    return (*names, "generic") if kind == "prompt" else tuple(names)


# Config field types, derived from the registered formats so a new format is one `@register` above.
PreferenceFormat = Literal[format_names("preference")]  # type: ignore[valid-type]
PromptFormat = Literal[format_names("prompt")]  # type: ignore[valid-type]


def _row_id(row: dict, column: str) -> str:
    """The row's own id, or '' (then the driver assigns file:row); a null id must not become 'None'."""
    v = row.get(column)
    return "" if v is None else str(v)


# ---------------------------------------------------------------- driver


@dataclass
class Loaded:
    examples: list
    report: LoadReport
    filtered: Counter = field(default_factory=Counter)


def data_files(spec: str | Path) -> list[Path | str]:
    """What `load` reads for `spec`: a directory's files in sorted order (hidden files and READMEs left out),
    else `spec` itself (a file or a hub id)."""
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith((".", "README")))
        if not files:
            raise FileNotFoundError(f"{spec}: directory holds no data files")
        return files
    return [spec]


def load(
    spec: str | Path,
    format: str,
    *,
    kind: str | None = None,
    on_bad_row: OnBadRow = "error",
    options: LoadOptions | None = None,
    limit: int | None = None,
    split: str = "train",
) -> Loaded:
    """Load and validate every row. `error` raises DataError listing all bad rows; `skip` reports them."""
    if format == "generic" and kind == "prompt":
        format = "generic-prompts"
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; choose from {sorted(FORMATS)}")
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    fmt = FORMATS[format]
    if kind is not None and fmt.kind != kind:
        raise ValueError(f"format {format!r} holds {fmt.kind} data, but {kind} data was asked for")
    opts = options or LoadOptions()
    report = LoadReport(str(spec), format)
    examples, filtered = [], Counter()
    for f in data_files(spec):
        src = opts.source_name or Path(str(f)).name
        for row_no, row in iter_rows(f, split=split):
            if limit is not None and len(examples) >= limit:
                break
            report.rows_read += 1
            if isinstance(row, BadRow):
                report.bad_rows.append(row)
                continue
            try:
                ex = fmt.parse(row, opts, src)
            except FieldError as e:
                report.bad_rows.append(BadRow(str(f), row_no, e.field, e.reason))
                continue
            except Filtered as e:
                filtered[str(e)] += 1
                continue
            if not ex.row_id:
                ex = _with_row_id(ex, f"{src}:{row_no}")
            examples.append(ex)
    report.kept = len(examples)
    if report.bad_rows and on_bad_row == "error":
        raise DataError(report.bad_rows)
    return Loaded(examples, report, filtered)


def _with_row_id(ex, row_id: str):
    return replace(ex, row_id=row_id)


def load_preferences(spec, format: str, **kw) -> Loaded:
    return load(spec, format, kind="preference", **kw)


def load_prompts(spec, format: str, **kw) -> Loaded:
    return load(spec, format, kind="prompt", **kw)


def save_bad_rows(loaded: Loaded, path: str | Path) -> None:
    """Write what was skipped and why (JSON), so `skip` never loses information."""
    data = {
        "file": loaded.report.file,
        "format": loaded.report.format,
        "rows_read": loaded.report.rows_read,
        "kept": loaded.report.kept,
        "filtered": dict(loaded.filtered),
        "bad_rows": [b.__dict__ for b in loaded.report.bad_rows],
    }
    Path(path).write_text(json.dumps(data, indent=1))
