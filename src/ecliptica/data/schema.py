"""Typed examples: the one shape every loader produces and every later stage consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant"]
SafetyLabel = Literal["safe", "unsafe"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class PreferenceExample:
    """A conversation that ends with a user turn, and two candidate assistant replies to it.

    `instruction` is the alignment directive (CITA's I); where it is placed is decided at formatting
    time, never here. `messages` holds every turn before the compared reply (multi-turn allowed).
    """

    messages: tuple[Message, ...]
    chosen: str
    rejected: str
    instruction: str | None = None
    source: str = ""
    row_id: str = ""
    category: str | None = None


@dataclass(frozen=True)
class PromptExample:
    """An evaluation prompt with its safety label and axiom (the harm area or XSTest type)."""

    prompt: str
    label: SafetyLabel
    axiom: str
    source: str = ""
    row_id: str = ""


@dataclass(frozen=True)
class BadRow:
    """Why one input row was rejected: enough to find and fix it."""

    file: str
    row: int  # 1-based data row number (header excluded)
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: row {self.row}: field '{self.field}': {self.reason}"


class DataError(ValueError):
    """Raised for bad input under `on_bad_row: error`; carries every bad row found."""

    def __init__(self, bad_rows: list[BadRow]):
        self.bad_rows = bad_rows
        head = "\n".join(str(b) for b in bad_rows[:50])
        more = f"\n... and {len(bad_rows) - 50} more" if len(bad_rows) > 50 else ""
        super().__init__(f"{len(bad_rows)} bad row(s):\n{head}{more}")


@dataclass
class LoadReport:
    """What a loader read, kept, and rejected (with reasons)."""

    file: str
    format: str
    rows_read: int = 0
    kept: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)
