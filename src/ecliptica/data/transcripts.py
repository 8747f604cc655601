"""HH-RLHF style transcripts: '\\n\\nHuman: ...\\n\\nAssistant: ...' turns."""

from __future__ import annotations

import re

from .schema import Message

_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_ROLE = {"Human": "user", "Assistant": "assistant"}


class TranscriptError(ValueError):
    pass


def parse_transcript(text: str) -> list[Message]:
    """Split a transcript into alternating user/assistant messages (all turns, not only the last two).

    The final assistant turn may be empty in the raw data; that is reported, not guessed around.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # Windows line ends: same turns, same text
    text = text if text.startswith("\n\n") else "\n\n" + text.lstrip()
    parts = _TURN.split(text)
    if parts[0].strip():
        raise TranscriptError("text before the first 'Human:' turn")
    messages = []
    for i in range(1, len(parts), 2):
        role, content = _ROLE[parts[i]], parts[i + 1].strip()
        messages.append(Message(role, content))
    if not messages:
        raise TranscriptError("no 'Human:'/'Assistant:' turns found")
    for k, m in enumerate(messages):
        expected = "user" if k % 2 == 0 else "assistant"
        if m.role != expected:
            raise TranscriptError(
                f"turn {k + 1} is {m.role!r}, expected {expected!r} (turns must alternate, starting with Human)"
            )
        if not m.content and k < len(messages) - 1:
            raise TranscriptError(f"turn {k + 1} ({m.role}) is empty")
    if messages[-1].role != "assistant":
        raise TranscriptError("transcript does not end with an Assistant turn")
    if not messages[-1].content:
        raise TranscriptError("final Assistant turn is empty")
    return messages


def split_pair(chosen: str, rejected: str) -> tuple[list[Message], str, str]:
    """Parse both transcripts; check they share every turn but the last assistant turn.

    Returns (shared context ending with a user turn, chosen reply, rejected reply).
    Raises TranscriptError with the field name as its first argument's prefix.
    """
    try:
        c = parse_transcript(chosen)
    except TranscriptError as e:
        raise TranscriptError(f"chosen|{e}") from None
    try:
        r = parse_transcript(rejected)
    except TranscriptError as e:
        raise TranscriptError(f"rejected|{e}") from None
    if len(c) != len(r):
        raise TranscriptError(
            f"rejected|has {len(r)} turns but chosen has {len(c)}; they must share all turns but the last"
        )
    for k, (a, b) in enumerate(zip(c[:-1], r[:-1])):
        if a != b:
            raise TranscriptError(f"rejected|turn {k + 1} differs from chosen; only the last assistant turn may differ")
    return c[:-1], c[-1].content, r[-1].content
