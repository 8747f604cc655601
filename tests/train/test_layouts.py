"""Each kind of example layout against hand-built expectations: the sequences an example contributes, their token
counts, the micro-batch and reference-cache shapes, and the per-role split of per-sequence values."""

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from ecliptica.data import TokenizedData, TokenizedPair
from ecliptica.losses import registry
from ecliptica.losses.base import SequenceStats
from ecliptica.losses.layout import CHOSEN_ONLY, PAIRED, UNPAIRED, UnpairedExample
from ecliptica.train.batching import collate
from ecliptica.train.reference import reference_logps

# two pairs: prompt, chosen, rejected token ids
P1 = TokenizedPair((11, 12), (13,), (14, 15), "r1")
P2 = TokenizedPair((21,), (22, 23), (24,), "r2")
DATA = TokenizedData([P1, P2])


class SumOfResponseIds:
    """A stand-in policy whose log-prob of a sequence is the sum of its response token ids, so the reference cache's
    rows can be written by hand."""

    peft_model = SimpleNamespace(disable_adapter=nullcontext)

    def __call__(self, batch):
        logps = torch.zeros(batch.n_sequences).index_add(0, batch.seq_index, batch.targets.float())
        return SequenceStats(logps, torch.ones(batch.n_sequences, dtype=torch.long))


def _cache(tmp_path, monkeypatch, layout, examples, micro_batch_size=1):
    monkeypatch.setenv("ECLIPTICA_CACHE", str(tmp_path))
    cfg = SimpleNamespace(
        model=SimpleNamespace(name="m", revision=None, dtype="fp32", load_in_4bit=False, attn_implementation=None),
        train=SimpleNamespace(micro_batch_size=micro_batch_size, packing=True, logp_chunk_size=1024),
    )
    policy = SumOfResponseIds()
    values, _ = reference_logps(policy, policy.peft_model, examples, layout, 0, cfg, "cpu", {}, progress=False)
    return values


def test_every_method_declares_its_layout():
    layouts = {name: cls.layout for name, cls in registry.METHODS.items()}
    assert layouts["sft"] is CHOSEN_ONLY
    assert all(layouts[m] is PAIRED for m in ("dpo", "ipo", "simpo", "orpo", "cita"))
    assert layouts["kto"] is UNPAIRED


def test_chosen_only(tmp_path, monkeypatch):
    examples = CHOSEN_ONLY.examples(DATA, max_length=8)
    assert examples == [P1, P2]
    assert CHOSEN_ONLY.sequences(examples) == [((11, 12), (13,)), ((21,), (22, 23))]
    assert [CHOSEN_ONLY.tokens(p) for p in examples] == [3, 3]
    assert [CHOSEN_ONLY.response_tokens(p) for p in examples] == [1, 2]
    assert CHOSEN_ONLY.worst_case_tokens(2, 100) == 200
    batch = collate(examples, CHOSEN_ONLY, pad_id=0)
    assert batch.input_ids.tolist() == [[11, 12, 13, 21, 22, 23]] and batch.n_sequences == 2
    assert batch.targets.tolist() == [13, 22, 23] and batch.seq_index.tolist() == [0, 1, 1]
    assert batch.labels is None
    (chosen,) = CHOSEN_ONLY.split(torch.tensor([1.0, 2.0]))
    assert chosen.tolist() == [1.0, 2.0]
    cache = _cache(tmp_path, monkeypatch, CHOSEN_ONLY, examples)
    assert cache.tolist() == [[13.0], [45.0]]  # [examples, 1]: the chosen responses' id sums
    assert CHOSEN_ONLY.by_role(cache).tolist() == [13.0, 45.0]


def test_paired(tmp_path, monkeypatch):
    examples = PAIRED.examples(DATA, max_length=8)
    assert examples == [P1, P2]
    # [chosen_1, chosen_2, rejected_1, rejected_2]
    assert PAIRED.sequences(examples) == [((11, 12), (13,)), ((21,), (22, 23)), ((11, 12), (14, 15)), ((21,), (24,))]
    assert [PAIRED.tokens(p) for p in examples] == [2 + 1 + 2 + 2, 1 + 2 + 1 + 1]
    assert [PAIRED.response_tokens(p) for p in examples] == [3, 3]
    assert PAIRED.worst_case_tokens(2, 100) == 400
    batch = collate(examples, PAIRED, pad_id=0, packed=False)
    assert batch.input_ids.tolist() == [[11, 12, 13, 0], [21, 22, 23, 0], [11, 12, 14, 15], [21, 24, 0, 0]]
    assert batch.targets.tolist() == [13, 22, 23, 14, 15, 24] and batch.seq_index.tolist() == [0, 1, 1, 2, 2, 3]
    chosen, rejected = PAIRED.split(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert chosen.tolist() == [1.0, 2.0] and rejected.tolist() == [3.0, 4.0]
    cache = _cache(tmp_path, monkeypatch, PAIRED, examples)
    assert cache.tolist() == [[13.0, 29.0], [45.0, 24.0]]  # [examples, (chosen, rejected)]
    # a micro-batch of examples (1, 0) reads its rows back in micro-batch order: chosen 1, chosen 0, rejected 1, ...
    assert PAIRED.by_role(cache[torch.tensor([1, 0])]).tolist() == [45.0, 13.0, 24.0, 29.0]


def test_unpaired_examples_follow_trl_unpairing_and_rotation():
    """TRL's unpair_preference_dataset on the same ids gives the completions and labels in the same order; the
    mismatched completion of example k is example k-1's (TRL's KTOTrainer rotates by one), cut at max_length."""
    datasets = pytest.importorskip("datasets")
    from trl.data_utils import unpair_preference_dataset

    examples = UNPAIRED.examples(DATA, max_length=3)
    rows = {
        "prompt": [list(p.prompt_ids) for p in DATA.pairs],
        "chosen": [list(p.chosen_ids) for p in DATA.pairs],
        "rejected": [list(p.rejected_ids) for p in DATA.pairs],
    }
    trl = unpair_preference_dataset(datasets.Dataset.from_dict(rows))
    assert [list(e.prompt_ids) for e in examples] == trl["prompt"]
    assert [list(e.completion_ids) for e in examples] == trl["completion"]
    assert [e.desirable for e in examples] == trl["label"] == [True, True, False, False]
    assert examples == [
        UnpairedExample((11, 12), (13,), True, (24,), "r1"),  # takes the last example's completion
        UnpairedExample((21,), (22, 23), True, (13,), "r2"),
        UnpairedExample((11, 12), (14, 15), False, (22,), "r1"),  # (22, 23) cut to max_length 3 after 2 prompt ids
        UnpairedExample((21,), (24,), False, (14, 15), "r2"),
    ]


def test_unpaired(tmp_path, monkeypatch):
    examples = UNPAIRED.examples(DATA, max_length=8)
    assert len(examples) == 4 and examples[2].mismatched_ids == (22, 23)  # nothing cut at max_length 8
    group = [examples[0], examples[2]]
    # [completion_0, completion_2, mismatched_0, mismatched_2]
    assert UNPAIRED.sequences(group) == [
        ((11, 12), (13,)),
        ((11, 12), (14, 15)),
        ((11, 12), (24,)),
        ((11, 12), (22, 23)),
    ]
    assert [UNPAIRED.tokens(e) for e in group] == [3 + 3, 4 + 4]
    assert [UNPAIRED.response_tokens(e) for e in group] == [2, 4]
    assert UNPAIRED.worst_case_tokens(2, 100) == 400
    assert UNPAIRED.fixed_micro_batches and not PAIRED.fixed_micro_batches and not CHOSEN_ONLY.fixed_micro_batches
    batch = collate(group, UNPAIRED, pad_id=0)
    assert batch.input_ids.tolist() == [[11, 12, 13, 11, 12, 14, 15, 11, 12, 24, 11, 12, 22, 23]]
    assert batch.targets.tolist() == [13, 14, 15, 24, 22, 23] and batch.seq_index.tolist() == [0, 1, 1, 2, 3, 3]
    assert batch.labels.tolist() == [True, False]
    completion, mismatched = UNPAIRED.split(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert completion.tolist() == [1.0, 2.0] and mismatched.tolist() == [3.0, 4.0]
    cache = _cache(tmp_path, monkeypatch, UNPAIRED, examples, micro_batch_size=3)  # groups of 3 and 1
    # [examples, (completion, mismatched)]
    assert cache.tolist() == [[13.0, 24.0], [45.0, 13.0], [29.0, 45.0], [24.0, 29.0]]
    assert UNPAIRED.by_role(cache[torch.tensor([3, 1])]).tolist() == [24.0, 45.0, 29.0, 13.0]


def test_reference_cache_is_keyed_by_layout(tmp_path, monkeypatch):
    """The same pairs under another layout are other sequences: never the other layout's cache."""
    paired = _cache(tmp_path, monkeypatch, PAIRED, DATA.pairs)
    unpaired = _cache(tmp_path, monkeypatch, UNPAIRED, UNPAIRED.examples(DATA, 8))
    assert paired.shape == (2, 2) and unpaired.shape == (4, 2)
    assert len(list((tmp_path / "reference").glob("*.safetensors"))) == 2
