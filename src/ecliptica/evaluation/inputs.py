"""Model inputs shared by embeddings, generation and drift: rendering, length-sorted batches, padding.

Prompts are rendered with the training chat template (`place_instruction` + `render_prompt`) and
tokenised without adding special tokens, exactly as `data.tokenize` does for training, so the model
sees evaluation prompts in the same form it was trained on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ecliptica.data import Message, Placement, TokenizeSettings, place_instruction, render_prompt, tokenize_pairs


def render_user_prompt(tokenizer, prompt: str, placement: Placement, instruction: str | None) -> str:
    """One user turn, with the instruction placed as in training, up to the generation prompt."""
    messages = place_instruction([Message("user", prompt)], instruction, placement)
    return render_prompt(tokenizer, messages)


def encode(tokenizer, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
    """Token ids per text; over-long prompts keep their end (the generation prompt must survive)."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    if max_length is not None:
        ids = [seq[-max_length:] for seq in ids]
    return ids


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length (longest first: memory peaks early)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right", device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) padded on `side`.

    Right padding is used for scoring passes: real tokens keep positions 0..len-1 and, under the
    causal mask, never see the padding, so a padded row equals the unpadded forward. Left padding
    is used for generation, where every row must end at the same position.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, span] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, span] = 1
    return ids.to(device), mask.to(device)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def inference_device() -> str:
    """Where an evaluated model goes: the first visible GPU (a study worker sees only its own), else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def tokenize_scored_pairs(tokenizer, examples: Sequence, s) -> list:
    """Preference examples tokenised as the drift and preference sections say (`s.placement`,
    `s.max_length`, `s.max_prompt_length`), for scoring their responses; the one place both (and the
    study's calibration) turn those settings into token ids."""
    settings = TokenizeSettings(max_length=s.max_length, max_prompt_length=s.max_prompt_length)
    return tokenize_pairs(tokenizer, list(examples), s.placement, settings, progress=False).pairs
