"""How many packed tokens one micro-batch holds when `train.micro_batch_tokens: auto`.

The split never changes what a step computes (the same examples in the same order, each micro-batch weighted by
its share of examples, token means taken over the whole step), so the budget is only a speed/memory choice:

- CUDA: a start-up probe runs two real micro-batches of different sizes (forward and backward, nothing
  stepped, random state restored), fits `peak = fixed + bytes_per_token x tokens`, and takes the largest
  budget whose predicted peak fits in `HEADROOM` of the memory this process may use: its share of the card
  (`ECLIPTICA_DEVICE_SHARED_BY` study workers split it), or `train.memory_budget_gib`, less what stays
  allocated under later micro-batches but not under the probe's: the optimizer state (from the first step on).
  The probe runs with the gradients already allocated, as every micro-batch after a step's first does, so its
  peak is the micro-batch's own working memory. Gradients made during the probe's backward would be counted
  twice, in its peak and as held, and under-fill the budget (by 0.16 GiB for the 4-bit 8B DPO step:
  docs/archive/benchmarks_history.md, "NF4 dequantisation inside the compiled layer", call 4).
- Anywhere else (CPU): the configured worst case, `micro_batch_size` examples whose every sequence (one per role of
  the method's layout: x2 for pairs) is `max_length` tokens. Memory never exceeds what the plain split could need;
  short examples share one forward.

Either way the budget is at least the longest example (on CUDA the longest in the training data, at most one
worst-case example; elsewhere one worst-case example) and at most the step's worst case (the whole step in one
micro-batch: a larger budget cannot help). A layout whose loss takes a statistic over each micro-batch (unpaired:
KTO's KL estimate) keeps the plain split, since re-splitting would change what the step computes.

The engine hands sizing only what it reads: the train settings, the layout, the longest example and, on CUDA, a
`Probe` (one micro-batch's forward and backward, the trainable parameters, step 0's examples).
"""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..config import TrainSection
from ..losses.layout import Layout

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


def available_bytes(
    free: int, total: int, reserved: int, allocated: int, shared_by: int = 1, budget_bytes: float | None = None
) -> float:
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


@dataclass(frozen=True)
class Probe:
    """What the CUDA memory probe needs of a run (the engine builds it: `Trainer.memory_probe`)."""

    # one micro-batch of these examples, forward and backward as in training: nothing synchronised or stepped, and
    # its gradients (and GRIT's factor sums) dropped afterwards
    run: Callable[[list[int]], None]
    step0: dict[int, int]  # this process's examples of step 0 -> their packed tokens: the probe's candidates
    trainable: list[torch.nn.Parameter]  # their gradients are allocated under the probe; AdamW's moments are held
    # the smallest of a value over the processes, so every rank splits alike (one process: the value itself)
    smallest: Callable[[int], int] = lambda n: n  # noqa: E731


def choose(
    train: TrainSection, max_length: int, layout: Layout, longest: int, device: torch.device, probe: Probe | None = None
) -> Choice:
    """The budget for this run. `longest`: the packed tokens of its longest example; `probe`: needed on CUDA only."""
    setting = train.micro_batch_tokens
    if layout.fixed_micro_batches:
        if setting not in (None, "auto"):
            raise ValueError(
                f"train.micro_batch_tokens: {setting}, but the {layout.name} layout's loss takes a "
                f"statistic over each micro-batch, so its micro-batches stay micro_batch_size examples; "
                f"set it to auto or null"
            )
        return Choice(
            None,
            f"off: the {layout.name} layout's loss takes a statistic over each micro-batch "
            f"(micro_batch_size x grad_accum)",
        )
    if setting is None:
        return Choice(None, "off (micro_batch_size x grad_accum)")
    if setting != "auto":
        return Choice(int(setting), "set in the config")
    floor = layout.worst_case_tokens(1, max_length)
    configured = layout.worst_case_tokens(train.micro_batch_size, max_length)
    cap = configured * train.grad_accum
    if device.type != "cuda":
        return Choice(
            configured,
            f"auto: {device.type}, the configured worst case "
            f"({train.micro_batch_size} examples x {max_length} tokens per sequence)",
        )
    # The longest example this run trains on: a micro-batch holds an example whole, so no budget below it can be
    # kept, and no example is longer, so a budget down to it (rather than down to the worst case) still holds them all.
    floor = min(floor, longest)
    fit = probe_memory(probe, train.micro_batch_size, configured)
    _allocate_gradients(probe.trainable)  # counted as allocated now, as under the probe and every later micro-batch
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    shared = int(os.environ.get("ECLIPTICA_DEVICE_SHARED_BY", "1"))
    budget = train.memory_budget_gib * 2**30 if train.memory_budget_gib else None
    avail = available_bytes(
        free, total, torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device), shared, budget
    )
    # Per trainable parameter, in its dtype: AdamW's two moments, allocated by the first step (the gradients were
    # allocated under the probe, so they are in the allocation `avail` starts from).
    held = 2 * sum(p.numel() * p.element_size() for p in probe.trainable)
    for p in probe.trainable:
        p.grad = None
    tokens = probe.smallest(budget_tokens(avail, held, fit, floor, cap))
    where = f" (card shared by {shared})" if shared > 1 else ""
    short = ""
    if fitting_tokens(avail, held, fit) < floor:
        # the floor still runs (a step must hold its longest example), but the memory goal cannot be kept
        short = "; less than the longest pair fits, so the peak may exceed it"
        warnings.warn(
            f"train.micro_batch_tokens auto: {avail / 2**30:.1f} GiB available holds less than the "
            f"longest pair ({floor} tokens); the peak may exceed the memory budget"
        )
    return Choice(
        tokens,
        f"auto: probe {fit.bytes_per_token / 2**20:.3f} MiB/token + {fit.fixed_bytes / 2**30:.2f} "
        f"GiB, {avail / 2**30:.1f} GiB available{where}, {HEADROOM:.0%} used; range [{floor}, {cap}]"
        f"{short}",
    )


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


def probe_memory(probe: Probe, micro_batch_size: int, limit: int) -> MemoryFit:
    """Peak memory above the current allocation of the two micro-batches of probe_groups (`limit`: the configured
    worst-case micro-batch). If the large one runs out of memory, the card cannot hold more than a configured
    micro-batch of these examples: the probe falls back to the `micro_batch_size` longest (the size it used before it
    took more), with a warning."""
    size, mbs = probe.step0, micro_batch_size
    small, large = probe_groups(size, mbs, limit)
    with _rng_restored():
        points = [_probe_point(probe, small)]
        out_of_memory = False
        try:
            points.append(_probe_point(probe, large))
        except torch.cuda.OutOfMemoryError:
            if len(large) <= mbs:
                raise
            out_of_memory = True  # retried below, outside the handler: its traceback holds the failed pass's tensors
        if out_of_memory:  # the failed pass already dropped its gradients
            gc.collect()
            torch.cuda.empty_cache()
            warnings.warn(
                f"train.micro_batch_tokens auto: the memory probe of {len(large)} pairs "
                f"({sum(size[i] for i in large)} tokens) ran out of memory; probing the {mbs} longest"
            )
            points.append(_probe_point(probe, large[:mbs]))
    return fit_memory(points[0], points[1])


def _allocate_gradients(trainable: list[torch.nn.Parameter]) -> None:
    """Zero gradients for the trainable parameters that have none, so they count as allocated before a micro-batch."""
    for p in trainable:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def _probe_point(probe: Probe, group: list[int]) -> tuple[int, float]:
    """(tokens, peak bytes above the allocation before it) of one forward and backward of `group`, nothing stepped.
    The gradients are allocated before it, as under a step's later micro-batches."""
    _allocate_gradients(probe.trainable)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    probe.run(group)
    torch.cuda.synchronize()
    return sum(probe.step0[i] for i in group), torch.cuda.max_memory_allocated() - base


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
