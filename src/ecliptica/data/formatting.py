"""Instruction placement and chat rendering: examples -> the exact text the model sees.

Placement is its own setting so the instruction effect can be separated from the loss effect:
  system  - the instruction is the system message (merged before any system message the data has);
  prepend - the instruction is put before the first user turn's text;
  none    - the instruction is not shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from .schema import Message, PreferenceExample

Placement = Literal["system", "prepend", "none"]
PLACEMENTS: tuple[str, ...] = get_args(Placement)

# Used only for tokenizers without a chat template (base models). Documented in docs/data.md.
FALLBACK_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}{% for m in messages %}"
    "{{ '### ' + m['role'].capitalize() + ':\n' + m['content'] + '\n\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


@dataclass(frozen=True)
class RenderedPair:
    prompt: str  # everything before the reply, generation prompt included
    chosen: str
    rejected: str


def place_instruction(
    messages: tuple[Message, ...] | list[Message], instruction: str | None, placement: Placement
) -> list[Message]:
    if placement not in PLACEMENTS:
        raise ValueError(f"instruction placement must be one of {PLACEMENTS}, got {placement!r}")
    msgs = list(messages)
    if placement == "none" or not instruction:
        return msgs
    if placement == "system":
        if msgs and msgs[0].role == "system":
            return [Message("system", instruction + "\n\n" + msgs[0].content)] + msgs[1:]
        return [Message("system", instruction)] + msgs
    k = next(i for i, m in enumerate(msgs) if m.role == "user")
    return msgs[:k] + [Message("user", instruction + "\n\n" + msgs[k].content)] + msgs[k + 1 :]


def render_prompt(tokenizer, messages: list[Message]) -> str:
    """The chat-template text up to and including the assistant generation prompt."""
    template = tokenizer.chat_template or FALLBACK_TEMPLATE
    return tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        chat_template=template,
        tokenize=False,
        add_generation_prompt=True,
    )


def render_pair(tokenizer, example: PreferenceExample, placement: Placement) -> RenderedPair:
    msgs = place_instruction(example.messages, example.instruction, placement)
    return RenderedPair(render_prompt(tokenizer, msgs), example.chosen, example.rejected)
