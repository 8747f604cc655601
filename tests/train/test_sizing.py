"""`micro_batch_tokens: auto`: the sizing rule against hand computations, with the card mocked."""

import warnings
from types import SimpleNamespace

import pytest
import torch

from ecliptica.losses.layout import CHOSEN_ONLY, PAIRED, UNPAIRED
from ecliptica.train import sizing
from ecliptica.train.sizing import MemoryFit

GiB, MiB = 2**30, 2**20


def test_fit_memory_through_two_probes():
    # peak = 1 GiB + 2 MiB/token, probed at 1000 and 3000 tokens
    fit = sizing.fit_memory((1000, GiB + 1000 * 2 * MiB), (3000, GiB + 3000 * 2 * MiB))
    assert fit.bytes_per_token == pytest.approx(2 * MiB)
    assert fit.fixed_bytes == pytest.approx(GiB)


def test_fit_memory_is_conservative_when_probes_cannot_separate_fixed_from_per_token():
    # sizes within 25% of each other, or a non-increasing peak: all memory counts as per-token (3 MiB/token here)
    close = sizing.fit_memory((900, 2700 * MiB), (1000, 3000 * MiB))
    noisy = sizing.fit_memory((500, 3100 * MiB), (1000, 3000 * MiB))
    for fit in (close, noisy):
        assert fit == MemoryFit(0.0, 3 * MiB)


def test_available_bytes_by_hand():
    # alone on an 80 GiB card: 60 GiB free, the allocator holds 18 GiB of which 16 are in use -> 60 + 2
    assert sizing.available_bytes(60 * GiB, 80 * GiB, 18 * GiB, 16 * GiB) == 62 * GiB
    # four study workers share it: 80/4 - 18 = 2 GiB of this worker's share left, + 2 cached
    assert sizing.available_bytes(60 * GiB, 80 * GiB, 18 * GiB, 16 * GiB, shared_by=4) == 4 * GiB
    # an explicit peak budget of 24 GiB with 16 allocated
    assert sizing.available_bytes(60 * GiB, 80 * GiB, 18 * GiB, 16 * GiB, budget_bytes=24 * GiB) == 8 * GiB


def test_budget_tokens_by_hand_with_floor_and_cap():
    fit = MemoryFit(fixed_bytes=2 * GiB, bytes_per_token=4 * MiB)
    # (62 GiB - 1 GiB optimizer state) * 0.85 - 2 GiB = 49.85 GiB -> 49.85 * 1024 / 4 = 12761.6 -> 12761 tokens
    assert sizing.budget_tokens(62 * GiB, GiB, fit, floor=2048, cap=16384) == 12761
    assert sizing.budget_tokens(62 * GiB, GiB, fit, floor=2048, cap=8192) == 8192  # never past the whole step
    assert sizing.budget_tokens(4 * GiB, GiB, fit, floor=2048, cap=16384) == 2048  # at least one worst-case pair


def test_probe_groups_by_hand():
    # step 0's pairs (index: tokens); micro_batch_size 2, configured worst case 4096 tokens
    size = {7: 300, 3: 900, 5: 150, 1: 700, 4: 800, 0: 1200, 2: 400, 6: 500}
    small, large = sizing.probe_groups(size, micro_batch_size=2, limit=4096)
    assert small == [5]  # the shortest pair
    # the 2 longest (1200 + 900), then 800 (2900), 700 (3600); 500 would make 4100 > 4096
    assert large == [0, 3, 4, 1]
    # a limit the 2 longest already fill: just them (never fewer than micro_batch_size)
    assert sizing.probe_groups(size, micro_batch_size=2, limit=2000)[1] == [0, 3]
    # the whole step fits: every pair, the shortest included
    assert sorted(sizing.probe_groups(size, micro_batch_size=2, limit=10_000)[1]) == sorted(size)


def _choose(
    device,
    micro_batch_tokens="auto",
    memory_budget_gib=None,
    trainable=1_000_000,
    longest=(512, 512, 512),
    layout=PAIRED,
):
    """sizing.choose for 2 examples x grad-accum 4 at max_length 1024. `longest`: (prompt, chosen, rejected) tokens of
    the data's longest pair, as a pair: 2 x prompt + chosen + rejected (the default is a worst-case pair)."""
    train = SimpleNamespace(
        micro_batch_tokens=micro_batch_tokens, micro_batch_size=2, grad_accum=4, memory_budget_gib=memory_budget_gib
    )
    weights = torch.nn.Linear(trainable, 1, bias=False)  # `trainable` trainable fp32 parameters
    probe = sizing.Probe(run=None, step0={}, trainable=list(weights.parameters()))  # the probe itself is mocked
    prompt, chosen, rejected = longest
    return sizing.choose(train, 1024, layout, 2 * prompt + chosen + rejected, torch.device(device), probe)


def test_choose_on_cpu_is_the_configured_worst_case():
    assert _choose("cpu").tokens == 2 * 2 * 1024  # 2 pairs x (chosen + rejected) x max_length
    assert _choose("cpu", layout=CHOSEN_ONLY).tokens == 2 * 1024  # 2 x chosen x max_length
    assert _choose("cpu", micro_batch_tokens=None).tokens is None
    assert _choose("cpu", micro_batch_tokens=3000).tokens == 3000


def test_a_layout_with_a_micro_batch_statistic_keeps_the_plain_split():
    """KTO's KL estimate is a mean over its micro-batch: the unpaired layout's micro-batches are never re-split."""
    for device in ("cpu", "cuda"):
        for setting in ("auto", None):
            assert _choose(device, micro_batch_tokens=setting, layout=UNPAIRED).tokens is None
    with pytest.raises(ValueError, match="micro_batch_tokens: 3000, but the unpaired layout"):
        _choose("cpu", micro_batch_tokens=3000, layout=UNPAIRED)


@pytest.mark.parametrize(
    "shared_by,budget_gib,longest,expected",
    [
        # (the longest pair is a worst-case one, 2 x (512 + 512) = 2048 tokens, unless said)
        # 40 GiB free of 80, allocator 20 reserved / 18 allocated (the gradients included): 40 + 2 = 42 GiB; AdamW's two
        # moments 2 x 4 B x 2^20 fp32 params = 8 MiB; (43008 MiB - 8 MiB) * 0.85 - 1024 MiB = 35526 MiB
        # / 2.5 MiB per token = 14210.4 -> 14210 tokens
        (1, None, (512, 512, 512), 14210),
        # two workers share the card: min(40, 80/2 - 20) + 2 = 22 GiB -> ((22528 - 8) * 0.85 - 1024) / 2.5 = 7247.2
        (2, None, (512, 512, 512), 7247),
        # an explicit 24 GiB peak budget: 24 - 18 = 6 GiB -> ((6144 - 8) * 0.85 - 1024) / 2.5 = 1676.64,
        # below one worst-case pair (2 x 1024 tokens): the floor
        (1, 24, (512, 512, 512), 2048),
        # the same budget when the data's longest pair is 2 x (500 + 250) = 1500 tokens: 1676 fits and holds every pair
        (1, 24, (500, 250, 250), 1676),
        # ... and when it is 2 x (600 + 300) = 1800 tokens: that pair is the floor
        (1, 24, (600, 300, 300), 1800),
    ],
)
def test_choose_on_cuda_by_hand(monkeypatch, shared_by, budget_gib, longest, expected):
    fit = MemoryFit(fixed_bytes=GiB, bytes_per_token=2.5 * MiB)
    monkeypatch.setattr(sizing, "probe_memory", lambda probe, micro_batch_size, limit: fit)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (40 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev: 20 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev: 18 * GiB)
    monkeypatch.setenv("ECLIPTICA_DEVICE_SHARED_BY", str(shared_by))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        choice = _choose("cuda", memory_budget_gib=budget_gib, trainable=2**20, longest=longest)
    assert choice.tokens == expected
    assert "2.500 MiB/token" in choice.rule
    # only a budget below the longest pair says (in the rule and as a warning) that it cannot be kept
    below = expected in (2048, 1800)
    assert ("peak may exceed" in choice.rule) == below
    assert any(f"less than the longest pair ({expected} tokens)" in str(w.message) for w in caught) == below


def test_choose_on_cuda_caps_at_the_whole_step(monkeypatch):
    monkeypatch.setattr(sizing, "probe_memory", lambda probe, micro_batch_size, limit: MemoryFit(0.0, 0.25 * MiB))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (120 * GiB, 140 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev: 16 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev: 16 * GiB)
    monkeypatch.delenv("ECLIPTICA_DEVICE_SHARED_BY", raising=False)
    assert _choose("cuda").tokens == 2 * 4 * 2 * 1024  # micro_batch_size x grad_accum pairs
