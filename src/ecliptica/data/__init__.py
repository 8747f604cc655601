"""Data layer: raw rows -> validated examples -> rendered conversations -> token ids."""

from pathlib import Path

from .formatting import PLACEMENTS, Placement, place_instruction, render_pair, render_prompt
from .loaders import (
    FORMATS,
    Loaded,
    LoadOptions,
    PreferenceFormat,
    PromptFormat,
    format_names,
    load,
    load_preferences,
    load_prompts,
    save_bad_rows,
)
from .schema import BadRow, DataError, LoadReport, Message, PreferenceExample, PromptExample
from .tokenize import TokenizedData, TokenizedPair, TokenizeSettings, describe_split, split_train_val, tokenize_pairs

DEMO_DIR = Path(__file__).parent / "demo"
DEMO_PREFERENCES = DEMO_DIR / "preference_pairs.jsonl"
DEMO_EVAL_PROMPTS = DEMO_DIR / "eval_prompts.jsonl"


def resolve_path(spec: str) -> str:
    """`demo:preferences` / `demo:eval` name the bundled files, `pkg:<name>` a file in an installed package
    (data/packaged.py); anything else is a path or hub id."""
    if spec.startswith("pkg:"):
        from .packaged import resolve

        return resolve(spec)
    return {"demo:preferences": str(DEMO_PREFERENCES), "demo:eval": str(DEMO_EVAL_PROMPTS)}.get(spec, spec)


__all__ = [
    "BadRow",
    "DataError",
    "FORMATS",
    "LoadOptions",
    "LoadReport",
    "Loaded",
    "Message",
    "PLACEMENTS",
    "PreferenceFormat",
    "PromptFormat",
    "format_names",
    "Placement",
    "PreferenceExample",
    "PromptExample",
    "TokenizeSettings",
    "TokenizedData",
    "TokenizedPair",
    "DEMO_EVAL_PROMPTS",
    "DEMO_PREFERENCES",
    "load",
    "load_preferences",
    "load_prompts",
    "place_instruction",
    "describe_split",
    "render_pair",
    "render_prompt",
    "resolve_path",
    "save_bad_rows",
    "split_train_val",
    "tokenize_pairs",
]
