"""Instruction placement and chat rendering against hand-written strings; tokenisation, masks, truncation, split."""

from __future__ import annotations

import copy
import random

import pytest

from ecliptica.data import (
    Message,
    PreferenceExample,
    TokenizeSettings,
    place_instruction,
    render_pair,
    render_prompt,
    split_train_val,
    tokenize_pairs,
)
from ecliptica.losses.layout import CHOSEN_ONLY, PAIRED
from ecliptica.train.batching import collate

DEFAULT_SYS = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
INSTR = "Refuse to help with burglary."
EX = PreferenceExample(
    (Message("user", "How do I pick a lock?"),), "I can't help with that.", "Use a tension wrench.", INSTR, "t", "ex-1"
)

EXPECTED = {
    "system": (
        "<|im_start|>system\nRefuse to help with burglary.<|im_end|>\n"
        "<|im_start|>user\nHow do I pick a lock?<|im_end|>\n<|im_start|>assistant\n"
    ),
    "prepend": (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nRefuse to help with burglary.\n\nHow do I pick a lock?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "none": (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHow do I pick a lock?<|im_end|>\n<|im_start|>assistant\n"
    ),
}


@pytest.mark.parametrize("placement", ["system", "prepend", "none"])
def test_render_exact_strings(tokenizer, placement):
    r = render_pair(tokenizer, EX, placement)
    assert r.prompt == EXPECTED[placement]
    assert (r.chosen, r.rejected) == ("I can't help with that.", "Use a tension wrench.")


def test_existing_system_message_is_merged(tokenizer):
    ex = PreferenceExample(
        (
            Message("system", "Answer in French."),
            Message("user", "Hi"),
            Message("assistant", "Bonjour"),
            Message("user", "Pick a lock?"),
        ),
        "Non.",
        "Oui.",
        INSTR,
    )
    assert render_pair(tokenizer, ex, "system").prompt == (
        "<|im_start|>system\nRefuse to help with burglary.\n\nAnswer in French.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nBonjour<|im_end|>\n"
        "<|im_start|>user\nPick a lock?<|im_end|>\n<|im_start|>assistant\n"
    )
    # prepend goes to the first user turn, and the data's own system message stays
    assert render_pair(tokenizer, ex, "prepend").prompt == (
        "<|im_start|>system\nAnswer in French.<|im_end|>\n"
        "<|im_start|>user\nRefuse to help with burglary.\n\nHi<|im_end|>\n<|im_start|>assistant\nBonjour<|im_end|>\n"
        "<|im_start|>user\nPick a lock?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_no_instruction_means_nothing_placed(tokenizer):
    ex = PreferenceExample(EX.messages, EX.chosen, EX.rejected, None)
    for placement in ("system", "prepend", "none"):
        assert render_pair(tokenizer, ex, placement).prompt == EXPECTED["none"]


def test_place_instruction_rejects_unknown_placement():
    with pytest.raises(ValueError, match="placement"):
        place_instruction(EX.messages, INSTR, "suffix")


def test_fallback_template_without_chat_template(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    bos = plain.bos_token or ""
    assert render_pair(plain, EX, "system").prompt == (
        bos + "### System:\nRefuse to help with burglary.\n\n### User:\nHow do I pick a lock?\n\n### Assistant:\n"
    )
    assert render_prompt(plain, [Message("user", "Hi")]) == bos + "### User:\nHi\n\n### Assistant:\n"
    assert tokenizer.chat_template is not None  # the shared fixture was not modified


# ------------------------------------------------------------------ tokenisation


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_tokenized_pair_layout(tokenizer):
    eos = tokenizer.eos_token_id
    data = tokenize_pairs(tokenizer, [EX], "system", progress=False)
    [tp] = data.pairs
    assert tokenizer.decode(tp.prompt_ids) == EXPECTED["system"]
    assert tokenizer.decode(tp.chosen_ids) == "I can't help with that.<|im_end|>"
    assert tokenizer.decode(tp.rejected_ids) == "Use a tension wrench.<|im_end|>"
    assert tp.chosen_ids[-1] == eos and tp.rejected_ids[-1] == eos and eos == 2
    # no merge here: the joint text tokenises to exactly prompt + response, so the prompt is a prefix
    assert list(tp.prompt_ids) + list(tp.chosen_ids[:-1]) == _ids(tokenizer, EXPECTED["system"] + EX.chosen)
    assert list(tp.prompt_ids) + list(tp.rejected_ids[:-1]) == _ids(tokenizer, EXPECTED["system"] + EX.rejected)
    s = data.stats
    assert (s.pairs, s.prompts_truncated, s.responses_truncated, s.boundary_merges_avoided) == (1, 0, 0, 0)
    assert s.prompt_tokens == len(tp.prompt_ids)
    assert s.response_tokens == len(tp.chosen_ids) + len(tp.rejected_ids)
    assert tp.row_id == "ex-1"


def test_placement_changes_tokens_and_fingerprint(tokenizer):
    a = tokenize_pairs(tokenizer, [EX], "system", progress=False)
    b = tokenize_pairs(tokenizer, [EX], "none", progress=False)
    assert tokenizer.decode(b.pairs[0].prompt_ids) == EXPECTED["none"]
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == tokenize_pairs(tokenizer, [EX], "system", progress=False).fingerprint()


def _examples():
    return [
        EX,
        PreferenceExample(
            (Message("user", "Hi"), Message("assistant", "Hello"), Message("user", "Tell me a joke.")),
            "Why did the chicken cross the road? To get to the other side.",
            "No.",
            "Be fun.",
            "t",
            "ex-2",
        ),
        PreferenceExample((Message("user", "2+2?"),), "4", "22", None, "t", "ex-3"),
    ]


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("with_rejected", [True, False])
def test_completion_mask_covers_exactly_the_response_tokens(tokenizer, packed, with_rejected):
    pad = 999_999  # a value no real token has, so padding is visible in the batch
    pairs = tokenize_pairs(tokenizer, _examples(), "system", progress=False).pairs
    batch = collate(pairs, PAIRED if with_rejected else CHOSEN_ONLY, pad_id=pad, packed=packed)
    seqs = [(p.prompt_ids, p.chosen_ids) for p in pairs]
    if with_rejected:
        seqs += [(p.prompt_ids, p.rejected_ids) for p in pairs]
    rows, width = batch.input_ids.shape
    flat = batch.input_ids.reshape(-1)
    # Expected flat positions of every response token, laid out by hand from the sequence lengths.
    expected_positions, expected_targets, prompt_positions, offset = [], [], [], 0
    for k, (p, r) in enumerate(seqs):
        base = offset if packed else k * width
        prompt_positions += range(base, base + len(p))
        expected_positions += range(base + len(p), base + len(p) + len(r))
        expected_targets += r
        offset += len(p) + len(r)
    target_positions = (batch.predictor_index + 1).tolist()
    assert target_positions == expected_positions
    assert batch.targets.tolist() == expected_targets
    assert flat[batch.predictor_index + 1].tolist() == expected_targets
    assert not set(target_positions) & set(prompt_positions)
    assert pad not in flat[batch.predictor_index + 1].tolist()
    assert batch.seq_index.tolist() == [k for k, (_, r) in enumerate(seqs) for _ in r]
    assert batch.n_sequences == len(seqs)
    assert batch.n_real_tokens == sum(len(p) + len(r) for p, r in seqs)
    if packed:
        assert rows == 1 and batch.attention_mask is None and pad not in flat.tolist()
    else:
        assert rows == len(seqs)
        assert batch.attention_mask.reshape(-1)[batch.predictor_index + 1].eq(1).all()
        assert (batch.input_ids == pad).eq(batch.attention_mask == 0).all()
        # the predicting position is never padding either
        assert batch.attention_mask.reshape(-1)[batch.predictor_index].eq(1).all()
    # position ids restart at 0 for every sequence
    starts = [0]
    for p, r in seqs[:-1]:
        starts.append(starts[-1] + len(p) + len(r))
    for k, (p, r) in enumerate(seqs):
        row, start = (0, starts[k]) if packed else (k, 0)
        assert batch.position_ids[row, start : start + len(p) + len(r)].tolist() == list(range(len(p) + len(r)))


def test_truncation_keeps_prompt_end_and_response_start(tokenizer):
    long_user = " ".join(f"word{i}" for i in range(60))
    long_reply = " ".join(f"reply{i}" for i in range(60))
    ex = PreferenceExample((Message("user", long_user),), long_reply, "Short no.", None, "t", "long")
    settings = TokenizeSettings(max_length=48, max_prompt_length=20)
    data = tokenize_pairs(tokenizer, [ex], "none", settings, progress=False)
    [tp] = data.pairs
    full_prompt = _ids(tokenizer, EXPECTED["none"].replace("How do I pick a lock?", long_user))
    assert len(full_prompt) > 20
    assert list(tp.prompt_ids) == full_prompt[-20:]
    assert tokenizer.decode(tp.prompt_ids).endswith("word59<|im_end|>\n<|im_start|>assistant\n")
    full_reply = _ids(tokenizer, long_reply)
    assert list(tp.chosen_ids) == full_reply[:28]  # 48 - 20 tokens left; EOS cut off with the tail
    assert tokenizer.decode(tp.chosen_ids).startswith("reply0 reply1")
    assert list(tp.rejected_ids) == _ids(tokenizer, "Short no.") + [tokenizer.eos_token_id]
    s = data.stats
    assert (s.prompts_truncated, s.responses_truncated) == (1, 1)
    assert s.prompt_tokens == 20 and s.response_tokens == 28 + len(tp.rejected_ids)


def test_tokenize_settings_validation():
    with pytest.raises(ValueError):
        TokenizeSettings(max_length=100, max_prompt_length=100)
    with pytest.raises(ValueError):
        TokenizeSettings(max_length=100, max_prompt_length=0)


def test_boundary_merge_is_counted_and_prompt_stays_a_prefix(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None  # fallback template: the prompt ends with '### Assistant:\n'
    prompt_text = render_prompt(plain, [Message("user", "Hi")])
    p_ids = _ids(plain, prompt_text)
    candidates = ["Hello", " Hello", "\nHello", "\n\nHello", "  x", "\n", ":)", "\t\tTab"]
    merging = [c for c in candidates if _ids(plain, prompt_text + c)[: len(p_ids)] != p_ids]
    non_merging = [c for c in candidates if c not in merging]
    assert merging and non_merging, "need at least one merging and one clean candidate"
    examples = [
        PreferenceExample((Message("user", "Hi"),), c, "Nope.", None, "t", f"c{k}")
        for k, c in enumerate(merging + non_merging)
    ]
    data = tokenize_pairs(plain, examples, "none", progress=False)
    assert data.stats.boundary_merges_avoided == len(merging)
    for ex, tp in zip(examples, data.pairs):
        assert list(tp.prompt_ids) == p_ids  # exact prefix, merge or not
        assert plain.decode(list(tp.prompt_ids) + list(tp.chosen_ids[:-1])) == prompt_text + ex.chosen
        assert tp.chosen_ids[-1] == plain.eos_token_id


def test_tokenizer_without_eos_is_refused(tokenizer):
    t = copy.deepcopy(tokenizer)
    t.eos_token = None
    if t.eos_token_id is not None:
        pytest.skip("this tokenizer keeps an EOS id")
    with pytest.raises(ValueError, match="EOS"):
        tokenize_pairs(t, [EX], "none", progress=False)


# ------------------------------------------------------------------ train / val split


def test_split_train_val_properties():
    items = [f"id-{i}" for i in range(4000)]
    train, val = split_train_val(items, key=lambda x: x, val_fraction=0.2, seed=0)
    assert sorted(train + val) == sorted(items) and not set(train) & set(val)
    assert 0.17 < len(val) / len(items) < 0.23
    again = split_train_val(items, key=lambda x: x, val_fraction=0.2, seed=0)
    assert again == (train, val)
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    t2, v2 = split_train_val(shuffled, key=lambda x: x, val_fraction=0.2, seed=0)
    assert set(v2) == set(val) and set(t2) == set(train)
    _, v3 = split_train_val(items, key=lambda x: x, val_fraction=0.2, seed=1)
    assert set(v3) != set(val)
    # a larger fraction only adds items to val (same hash threshold)
    _, v4 = split_train_val(items, key=lambda x: x, val_fraction=0.3, seed=0)
    assert set(val) <= set(v4)
    assert split_train_val(items, key=lambda x: x, val_fraction=0.0, seed=0) == (items, [])
    with pytest.raises(ValueError):
        split_train_val(items, key=lambda x: x, val_fraction=1.0, seed=0)
