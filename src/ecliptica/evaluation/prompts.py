"""Evaluation prompt sets: LITMUS, XSTest, Do-Not-Answer (+ a benign set, e.g. MT-Bench), the bundled demo prompts.

Every source goes through `data.load_prompts`, so bad rows are named, never dropped silently.
Balanced sampling draws per (axiom, label) group with a seeded generator and keeps file order
inside the sample, so the same settings always give the same prompts in the same order.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from ecliptica.data import PromptExample, format_names, load_prompts, resolve_path

EVAL_FORMATS = format_names("prompt")


def load_eval_prompts(
    path: str = "demo:eval",
    format: str = "generic",
    *,
    limit: int | None = None,
    per_group: int | None = None,
    seed: int = 0,
    benign_path: str | None = None,
    benign_format: str = "generic",
    on_bad_row: str = "error",
) -> list[PromptExample]:
    """Load, combine and sample evaluation prompts.

    `benign_path` adds a second source (e.g. safe prompts next to the all-unsafe Do-Not-Answer).
    `per_group` caps every (axiom, label) group at that many prompts (LITMUS-style balancing);
    `limit` then takes a balanced subset of that size across groups.
    """
    if format not in EVAL_FORMATS:
        raise ValueError(f"eval data format must be one of {EVAL_FORMATS}, got {format!r}")
    examples = load_prompts(resolve_path(path), format, on_bad_row=on_bad_row).examples
    if benign_path:
        examples += load_prompts(resolve_path(benign_path), benign_format, on_bad_row=on_bad_row).examples
    if per_group is not None:
        examples = cap_per_group(examples, per_group, seed)
    if limit is not None:
        examples = balanced_subset(examples, limit, seed)
    if not examples:
        raise ValueError(f"{path}: no evaluation prompts left after sampling")
    return examples


def _groups(examples: Sequence[PromptExample]) -> dict[tuple[str, str], list[int]]:
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[(ex.axiom, ex.label)].append(i)
    return dict(sorted(groups.items()))


def cap_per_group(examples: Sequence[PromptExample], per_group: int, seed: int = 0) -> list[PromptExample]:
    """At most `per_group` prompts from every (axiom, label) group, drawn without replacement."""
    if per_group < 1:
        raise ValueError(f"per_group must be >= 1, got {per_group}")
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for members in _groups(examples).values():
        picked = rng.permutation(members)[:per_group] if len(members) > per_group else members
        keep.extend(int(i) for i in picked)
    return [examples[i] for i in sorted(keep)]


def balanced_subset(examples: Sequence[PromptExample], n: int, seed: int = 0) -> list[PromptExample]:
    """`n` prompts spread as evenly as possible over (axiom, label) groups (round robin)."""
    if n < 1:
        raise ValueError(f"a prompt limit must be >= 1, got {n}")
    if n >= len(examples):
        return list(examples)
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(members)) for members in _groups(examples).values()]
    keep: list[int] = []
    while len(keep) < n:
        for queue in queues:
            if queue and len(keep) < n:
                keep.append(int(queue.pop(0)))
    return [examples[i] for i in sorted(keep)]


def prompts_hash(examples: Sequence[PromptExample]) -> str:
    """Identity of a prompt set, in order: texts, labels and axioms."""
    payload = json.dumps([[e.prompt, e.label, e.axiom] for e in examples], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()
