"""How many packed tokens one micro-batch holds when `train.micro_batch_tokens: auto`.

The split never changes what a step computes (the same pairs in the same order, each micro-batch weighted by
its share of pairs, token means taken over the whole step), so the budget is only a speed/memory choice:

- CUDA: a start-up probe runs two real micro-batches of different sizes (forward and backward, nothing
  stepped, random state restored), fits `peak = fixed + bytes_per_token x tokens`, and takes the largest
  budget whose predicted peak fits in `HEADROOM` of the memory this process may use: its share of the card
  (`ECLIPTICA_DEVICE_SHARED_BY` study workers split it), or `train.memory_budget_gib`, less what stays
  allocated under later micro-batches but not under the probe's: the optimizer state (from the first step on).
  The probe runs with the gradients already allocated, as every micro-batch after a step's first does, so its
  peak is the micro-batch's own working memory (before, gradients made during the probe's backward were counted
  in its peak and again as held: the 4-bit 8B DPO peak came 0.16 GiB under the prediction, docs/benchmarks.md
  "Speed v8").
- Anywhere else (CPU): the configured worst case, `micro_batch_size` examples whose every sequence (one per role of
  the method's layout: x2 for pairs) is `max_length` tokens. Memory never exceeds what the plain split could need;
  short examples share one forward.

Either way the budget is at least the longest pair (on CUDA the longest in the training data, at most one worst-case
pair; elsewhere one worst-case pair) and at most the step's worst case (the whole step in one micro-batch: a larger
budget cannot help). A layout whose loss takes a statistic over each micro-batch (unpaired: KTO's KL estimate) keeps
the plain split, since re-splitting would change what the step computes.
"""
from __future__ import annotations

import gc
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch


# Share of the available memory the fitted peak may use: the allocator's rounding and fragmentation, and the
# dense mask's tokens^2 term, which a straight-line fit through two small probes does not see.
HEADROOM = 0.85


@dataclass(frozen=True)
class MemoryFit:
    """Peak memory of one micro-batch above what is allocated before it: fixed + per_token x tokens."""

    fixed_bytes: float
    bytes_per_token: float


@dataclass(frozen=True)
class Choice:
    tokens: int | None  # None: the plain micro_batch_size x grad_accum split
    rule: str  # how it was chosen, for the log and summary.json


def fit_memory(small: tuple[int, float], large: tuple[int, float]) -> MemoryFit:
    """Line through two (tokens, peak bytes) probes. When they are too close in size, or the slope is not
    positive (noise), all memory counts as per-token: that over-estimates larger batches, never under."""
    (n1, p1), (n2, p2) = sorted([small, large])
    whole = MemoryFit(0.0, p2 / n2)
    if n2 - n1 < 0.25 * n2 or p2 <= p1:
        return whole
    slope = (p2 - p1) / (n2 - n1)
    return MemoryFit(max(p2 - slope * n2, 0.0), slope)


def available_bytes(free: int, total: int, reserved: int, allocated: int, shared_by: int = 1,
                    budget_bytes: float | None = None) -> float:
    """Memory a micro-batch may still use. With a budget: the budget less what is allocated now. Otherwise
    the card's free memory (capped by this process's 1/shared_by share of the card, less what its allocator
    holds), plus what the allocator holds but is not using."""
    if budget_bytes is not None:
        return budget_bytes - allocated
    return min(free, total / shared_by - reserved) + (reserved - allocated)


def fitting_tokens(available: float, held_bytes: float, fit: MemoryFit) -> int:
    """Largest token count whose predicted peak fits in HEADROOM of (available - held), unclamped; `held`: memory
    that later micro-batches find allocated and the probe did not (gradients, optimizer state)."""
    room = (available - held_bytes) * HEADROOM - fit.fixed_bytes
    return int(room // fit.bytes_per_token)


def budget_tokens(available: float, held_bytes: float, fit: MemoryFit, floor: int, cap: int) -> int:
    """fitting_tokens, kept between the longest pair (`floor`) and the whole step (`cap`)."""
    return max(floor, min(cap, fitting_tokens(available, held_bytes, fit)))


def choose(trainer) -> Choice:
    """The budget for this run (`trainer` is a set-up engine Trainer)."""
    cfg, acc = trainer.cfg, trainer.accelerator
    setting = cfg.train.micro_batch_tokens
    layout = trainer.layout
    if layout.fixed_micro_batches:
        if setting not in (None, "auto"):
            raise ValueError(f"train.micro_batch_tokens: {setting}, but the {layout.name} layout's loss takes a "
                             f"statistic over each micro-batch, so its micro-batches stay micro_batch_size examples; "
                             f"set it to auto or null")
        return Choice(None, f"off: the {layout.name} layout's loss takes a statistic over each micro-batch "
                            f"(micro_batch_size x grad_accum)")
    if setting is None:
        return Choice(None, "off (micro_batch_size x grad_accum)")
    if setting != "auto":
        return Choice(int(setting), "set in the config")
    floor = layout.worst_case_tokens(1, cfg.data.max_length)
    configured = layout.worst_case_tokens(cfg.train.micro_batch_size, cfg.data.max_length)
    cap = configured * cfg.train.grad_accum
    if acc.device.type != "cuda":
        return Choice(configured, f"auto: {acc.device.type}, the configured worst case "
                                  f"({cfg.train.micro_batch_size} examples x {cfg.data.max_length} tokens a sequence)")
    # The longest example this run trains on: a micro-batch holds an example whole, so no budget below it can be
    # kept, and no example is longer, so a budget down to it (rather than down to the worst case) still holds them all.
    floor = min(floor, max((layout.tokens(ex) for ex in trainer.examples), default=floor))
    fit = probe_memory(trainer)
    dev = acc.device
    _allocate_gradients(trainer)  # counted as allocated now, as under the probe and every later micro-batch
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(dev)
    shared = int(os.environ.get("ECLIPTICA_DEVICE_SHARED_BY", "1"))
    budget = cfg.train.memory_budget_gib * 2**30 if cfg.train.memory_budget_gib else None
    avail = available_bytes(free, total, torch.cuda.memory_reserved(dev), torch.cuda.memory_allocated(dev),
                            shared, budget)
    # Per trainable parameter, in its dtype: AdamW's two moments, allocated by the first step (the gradients were
    # allocated under the probe, so they are in the allocation `avail` starts from).
    held = 2 * sum(p.numel() * p.element_size() for p in trainer.policy.parameters() if p.requires_grad)
    trainer.optimizer.zero_grad(set_to_none=True)
    tokens = budget_tokens(avail, held, fit, floor, cap)
    if acc.num_processes > 1:  # every rank splits the same way
        tokens = int(acc.gather(torch.tensor([tokens], device=dev)).min())
    where = f" (card shared by {shared})" if shared > 1 else ""
    short = ""
    if fitting_tokens(avail, held, fit) < floor:
        # the floor still runs (a step must hold its longest pair), but the memory goal cannot be kept
        short = "; less than the longest pair fits, so the peak may exceed it"
        warnings.warn(f"train.micro_batch_tokens auto: {avail / 2**30:.1f} GiB available holds less than the "
                      f"longest pair ({floor} tokens); the peak may exceed the memory budget")
    return Choice(tokens, f"auto: probe {fit.bytes_per_token / 2**20:.3f} MiB/token + {fit.fixed_bytes / 2**30:.2f} "
                          f"GiB, {avail / 2**30:.1f} GiB available{where}, {HEADROOM:.0%} used; range [{floor}, {cap}]"
                          f"{short}")


def probe_groups(size: dict[int, int], micro_batch_size: int, limit: int) -> tuple[list[int], list[int]]:
    """The probe's two micro-batches from step 0's pairs (`size`: pair index -> tokens). Small: the shortest pair.
    Large: the `micro_batch_size` longest pairs, then the next longest while the total stays within `limit` (the
    configured worst-case micro-batch, a size the configuration already asks the card to hold). A large probe near
    the sizes the budget will pick keeps the line's extrapolation short; short pairs let it hold more than
    micro_batch_size of them."""
    by_size = sorted(size, key=lambda i: (size[i], i))
    large = by_size[-micro_batch_size:][::-1]
    total = sum(size[i] for i in large)
    for i in reversed(by_size[:-micro_batch_size]):
        if total + size[i] > limit:
            break
        large.append(i)
        total += size[i]
    return by_size[:1], large


def probe_memory(trainer) -> MemoryFit:
    """Peak memory above the current allocation of the two micro-batches of probe_groups. If the large one runs out
    of memory, the card cannot hold more than a configured micro-batch of these pairs: the probe falls back to the
    `micro_batch_size` longest (the size it used before it took more), with a warning."""
    cfg = trainer.cfg
    layout = trainer.layout
    mbs = cfg.train.micro_batch_size
    idx = [i for k in range(cfg.train.grad_accum) for i in trainer.micro_batch_indices(k)]
    size = {i: layout.tokens(trainer.examples[i]) for i in idx}
    small, large = probe_groups(size, mbs, layout.worst_case_tokens(mbs, cfg.data.max_length))
    was_training = trainer.policy.training
    trainer.policy.train()  # as in training: checkpointing and dropout act only in train mode
    with _rng_restored():
        points = [_probe_point(trainer, small, size)]
        out_of_memory = False
        try:
            points.append(_probe_point(trainer, large, size))
        except torch.cuda.OutOfMemoryError:
            if len(large) <= mbs:
                raise
            out_of_memory = True  # retried below, outside the handler: its traceback holds the failed pass's tensors
        if out_of_memory:  # _probe_point already dropped the failed pass's gradients
            gc.collect()
            torch.cuda.empty_cache()
            warnings.warn(f"train.micro_batch_tokens auto: the memory probe of {len(large)} pairs "
                          f"({sum(size[i] for i in large)} tokens) ran out of memory; probing the {mbs} longest")
            points.append(_probe_point(trainer, large[:mbs], size))
    trainer.policy.train(was_training)
    return fit_memory(points[0], points[1])


def _allocate_gradients(trainer) -> None:
    """Zero gradients for the trainable parameters that have none, so they count as allocated before a micro-batch."""
    for p in trainer.policy.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def _probe_point(trainer, group: list[int], size: dict[int, int]) -> tuple[int, float]:
    """(tokens, peak bytes above the allocation before it) of one forward and backward of `group`, nothing stepped.
    The gradients are allocated before it, as under a step's later micro-batches."""
    acc = trainer.accelerator
    _allocate_gradients(trainer)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        with acc.no_sync(trainer.policy):  # nothing is synchronised or stepped
            loss, _, _ = trainer._micro_step(group, 0.0)
            acc.backward(loss)
        del loss
        torch.cuda.synchronize()
        return sum(size[i] for i in group), torch.cuda.max_memory_allocated() - base
    finally:
        trainer.optimizer.zero_grad(set_to_none=True)  # also clears GRIT's factor sums


@contextmanager
def _rng_restored():
    """Dropout in the probe must not shift the random stream the run then sees."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
