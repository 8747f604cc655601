"""Tokenisation: rendered pairs -> prompt / response token ids, with truncation counted.

Prompt and responses are tokenised separately and concatenated, so the prompt tokens are always
an exact prefix of prompt+response (tokenising the joined text can merge tokens across the
boundary and shift the completion mask; how often that would have happened is counted).
Each response ends with EOS so the model learns to stop.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from .formatting import Placement, render_pair
from .schema import PreferenceExample


@dataclass
class TokenizeSettings:
    max_length: int = 1024  # prompt + one response
    max_prompt_length: int = 512  # the prompt keeps its end (the latest turns)

    def __post_init__(self):
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(f"need 0 < max_prompt_length ({self.max_prompt_length}) < max_length ({self.max_length})")


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    row_id: str = ""


@dataclass
class TokenizeStats:
    pairs: int = 0
    prompts_truncated: int = 0
    instructions_truncated: int = 0  # truncation removed part of the instruction
    responses_truncated: int = 0
    boundary_merges_avoided: int = 0
    prompt_tokens: int = 0
    response_tokens: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class TokenizedData:
    pairs: list[TokenizedPair]
    stats: TokenizeStats = field(default_factory=TokenizeStats)

    def fingerprint(self) -> str:
        """Hash of the exact token ids: equal only if data, template and tokenisation all match."""
        h = hashlib.sha256()
        for p in self.pairs:
            h.update(json.dumps([p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
        return h.hexdigest()[:16]


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def tokenize_pairs(
    tokenizer,
    examples: list[PreferenceExample],
    placement: Placement,
    settings: TokenizeSettings | None = None,
    progress: bool = True,
) -> TokenizedData:
    settings = settings or TokenizeSettings()
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; responses could not be terminated")
    out, stats = [], TokenizeStats()
    batch = 256
    for start in tqdm(range(0, len(examples), batch), desc="tokenising", disable=not progress, leave=False):
        chunk = examples[start : start + batch]
        rendered = [render_pair(tokenizer, ex, placement) for ex in chunk]
        prompts = _ids(tokenizer, [r.prompt for r in rendered])
        chosen = _ids(tokenizer, [r.chosen for r in rendered])
        rejected = _ids(tokenizer, [r.rejected for r in rendered])
        joint = _ids(tokenizer, [r.prompt + r.chosen for r in rendered])
        for ex, p, c, r, j in zip(chunk, prompts, chosen, rejected, joint):
            stats.boundary_merges_avoided += int(j[: len(p)] != p)
            if len(p) > settings.max_prompt_length:
                p = p[-settings.max_prompt_length :]
                stats.prompts_truncated += 1
                # the prompt keeps its end, so an instruction at its start is the first thing cut
                if ex.instruction and placement != "none" and ex.instruction.strip() not in tokenizer.decode(p):
                    stats.instructions_truncated += 1
            budget = settings.max_length - len(p)
            c, r = c + [eos], r + [eos]
            for resp in (c, r):
                stats.responses_truncated += int(len(resp) > budget)
            c, r = c[:budget], r[:budget]
            stats.pairs += 1
            stats.prompt_tokens += len(p)
            stats.response_tokens += len(c) + len(r)
            out.append(TokenizedPair(tuple(p), tuple(c), tuple(r), ex.row_id))
    if stats.instructions_truncated:
        warnings.warn(
            f"truncation removed part of the instruction in {stats.instructions_truncated} of {stats.pairs} "
            f"prompts (max_prompt_length={settings.max_prompt_length}); the model will not see it whole. "
            f"Raise max_prompt_length (and max_length) or shorten the context",
            RuntimeWarning,
            stacklevel=2,
        )
    return TokenizedData(out, stats)


def split_train_val(items: list, key, val_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic split by a stable hash of each item's key: independent of order and process."""
    if not 0 <= val_fraction < 1:
        raise ValueError("val_fraction must be in [0, 1)")
    train, val = [], []
    for item in items:
        digest = hashlib.sha256(f"{seed}:{key(item)}".encode()).digest()
        (val if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else train).append(item)
    return train, val


def describe_split(train_ids: list[str], val_ids: list[str], val_fraction: float, seed: int) -> dict:
    """What identifies a train/val split: sizes and a hash of each side's sorted ids (the ids themselves
    go to the run's split.json). Two runs used the same split exactly when these agree."""
    digest = lambda ids: hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]  # noqa: E731
    return {
        "seed": seed,
        "val_fraction": val_fraction,
        "n_train": len(train_ids),
        "n_val": len(val_ids),
        "train_ids_hash": digest(train_ids),
        "val_ids_hash": digest(val_ids),
    }
