"""How a method lays its examples out as sequences: the one place that knows whether an example is a chosen
response, a preference pair, or an unpaired response with a desirable/undesirable label.

An example contributes one sequence (prompt, response) per role. A micro-batch of B examples holds them role by
role: every example's first sequence, then every example's second ([chosen_1..chosen_B, rejected_1..rejected_B]
for pairs), so one forward scores them all and `split` hands each role back as a [B] tensor. Batching, sizing,
the data order and the reference cache ask the layout; nothing else assumes a pair.

  ChosenOnly  a pair's chosen response (SFT)                                     roles: chosen
  Paired      a pair's chosen and rejected responses (DPO, IPO, SimPO, ORPO, CITA) roles: chosen, rejected
  Unpaired    each response of each pair as its own example, desirable (chosen) or undesirable (rejected), as
              TRL's `unpair_preference_dataset`; each also carries another example's response after its own
              prompt, for a KL estimate on mismatched pairs (KTO)                  roles: completion, mismatched
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..data.tokenize import TokenizedData, TokenizedPair

Ids = tuple[int, ...]
PromptResponse = tuple[Ids, Ids]  # one sequence: (prompt ids, response ids)


class Layout:
    """The examples a method trains on and the sequences each contributes (see the module docstring)."""

    name: ClassVar[str]
    roles: ClassVar[tuple[str, ...]]  # one sequence per role and example, in micro-batch order
    pair_responses: ClassVar[tuple[str, ...]]  # the responses of a preference pair the method trains on
    # True: the loss takes a statistic over each micro-batch's examples (KTO's KL estimate), so a step's micro-batches
    # stay `micro_batch_size` examples each and are never re-split by tokens (train/sizing.py)
    fixed_micro_batches: ClassVar[bool] = False

    def examples(self, data: TokenizedData, max_length: int) -> list:
        """What the data order draws from; `max_length` bounds any sequence the layout builds itself."""
        return data.pairs

    def example_sequences(self, example) -> tuple[PromptResponse, ...]:
        """The example's sequences, one per role."""
        raise NotImplementedError

    def labels(self, examples: list) -> torch.Tensor | None:
        """[B] per-example labels the loss reads (None: the layout has none)."""
        return None

    def sequences(self, examples: list) -> list[PromptResponse]:
        """The micro-batch's sequences, role by role."""
        per_example = [self.example_sequences(ex) for ex in examples]
        return [seqs[r] for r in range(len(self.roles)) for seqs in per_example]

    def tokens(self, example) -> int:
        """Tokens the example adds to a packed micro-batch."""
        return sum(len(p) + len(r) for p, r in self.example_sequences(example))

    def response_tokens(self, example) -> int:
        """Response tokens the example adds to the loss's token means."""
        return sum(len(r) for _, r in self.example_sequences(example))

    def worst_case_tokens(self, n_examples: int, max_length: int) -> int:
        """Tokens of `n_examples` examples whose every sequence is `max_length` long."""
        return n_examples * len(self.roles) * max_length

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[roles x B] per-sequence values of a micro-batch -> one [B] tensor per role."""
        return tuple(x.reshape(len(self.roles), -1))

    def by_example(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sequence values of a micro-batch -> [B, roles] (a row per example: the reference cache's rows)."""
        return x.reshape(len(self.roles), -1).T

    def by_role(self, table: torch.Tensor) -> torch.Tensor:
        """[B, roles] rows of examples -> per-sequence values in micro-batch order (the inverse of by_example)."""
        return table.T.reshape(-1)


class ChosenOnly(Layout):
    name = "chosen_only"
    roles = ("chosen",)
    pair_responses = ("chosen",)

    def example_sequences(self, pair: TokenizedPair):
        return ((pair.prompt_ids, pair.chosen_ids),)


class Paired(Layout):
    name = "paired"
    roles = ("chosen", "rejected")
    pair_responses = ("chosen", "rejected")

    def example_sequences(self, pair: TokenizedPair):
        return (pair.prompt_ids, pair.chosen_ids), (pair.prompt_ids, pair.rejected_ids)


@dataclass(frozen=True)
class UnpairedExample:
    prompt_ids: Ids
    completion_ids: Ids
    desirable: bool  # the pair's chosen response (True) or its rejected one (False)
    mismatched_ids: Ids  # another example's completion, scored after this prompt (the KL estimate's sample)
    row_id: str = ""


def unpair(pairs: list[TokenizedPair], max_length: int) -> list[UnpairedExample]:
    """Every pair's chosen response as a desirable example, then every rejected one as an undesirable example (TRL's
    `unpair_preference_dataset` order). Example k's mismatched completion is example k-1's (the first takes the last),
    cut to fit `max_length` after its prompt: TRL's KTOTrainer rotates the completions by one in the same way, and
    cuts a sequence's end at `max_length`. TRL rotates within each chunk of `per_device_train_batch_size` because its
    sampler is sequential; examples here are drawn in a random order, so the whole list is one chunk."""
    flat = [(p, p.chosen_ids, True) for p in pairs] + [(p, p.rejected_ids, False) for p in pairs]
    out = []
    for k, (pair, completion, desirable) in enumerate(flat):
        other = flat[k - 1][1]
        out.append(
            UnpairedExample(
                pair.prompt_ids, completion, desirable, other[: max_length - len(pair.prompt_ids)], pair.row_id
            )
        )
    return out


class Unpaired(Layout):
    name = "unpaired"
    roles = ("completion", "mismatched")
    pair_responses = ("chosen", "rejected")
    fixed_micro_batches = True

    def examples(self, data, max_length):
        return unpair(data.pairs, max_length)

    def example_sequences(self, ex: UnpairedExample):
        return (ex.prompt_ids, ex.completion_ids), (ex.prompt_ids, ex.mismatched_ids)

    def labels(self, examples):
        return torch.tensor([ex.desirable for ex in examples], dtype=torch.bool)


CHOSEN_ONLY, PAIRED, UNPAIRED = ChosenOnly(), Paired(), Unpaired()
