"""What the engine and GRIT need to know about FSDP2's sharded tensors (DTensor), in one place.

Under FSDP2 (accelerate's `fsdp_version: 2`) every parameter of a sharded module is a DTensor holding 1/N of its
rows on each process, and so are its gradient and its optimizer state. The LoRA tensors are small, so where the
whole tensor is needed (GRIT's rank-space solves mix rows of A; a checkpoint or the final adapter is written
whole) it is gathered, and the process's own rows are written back; elsewhere the local rows are used.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch without distributed support: nothing is ever sharded
    DTensor, distribute_tensor = (), None


def is_sharded(t) -> bool:
    return isinstance(t, DTensor) if DTensor else False


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective on every process when `t` is sharded; each must call it in the same order)."""
    return t.full_tensor() if is_sharded(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's rows of `t` (all of it when `t` is not sharded)."""
    return t.to_local() if is_sharded(t) else t


def write_full(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the whole tensor `value` into `target`, of which this process may hold only some rows."""
    if is_sharded(target):
        value = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements).to_local()
        target.to_local().copy_(value)
    else:
        target.copy_(value)


def agree_all(flag: torch.Tensor) -> torch.Tensor:
    """A bool that is true only where it is true on every process (the update check must decide alike on all)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    as_int = flag.to(torch.int32).reshape(1)
    dist.all_reduce(as_int, op=dist.ReduceOp.MIN)
    return as_int.reshape(()).bool()


def full_state(obj):
    """`obj` (an optimizer or adapter state: nested dicts, lists, tensors) with every sharded tensor gathered
    whole, in a fixed traversal order so that every process runs the same collectives."""
    if is_sharded(obj):
        return obj.full_tensor()
    if isinstance(obj, dict):
        return {k: full_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_state(v) for v in obj)
    return obj


def shard_optimizer_state(optimizer) -> None:
    """After `load_state_dict` of whole tensors (a checkpoint): each sharded parameter's state tensors of its shape
    become sharded like it, so the optimizer's update works on the process's own rows."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    for group in inner.param_groups:
        for p in group["params"]:
            if not is_sharded(p):
                continue
            state = inner.state.get(p, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and not is_sharded(value) and tuple(value.shape) == tuple(p.shape):
                    state[key] = distribute_tensor(
                        value.to(device=p.device, dtype=value.dtype), p.device_mesh, p.placements
                    )


def load_sharded_adapter(peft_model, weights: dict[str, torch.Tensor]) -> None:
    """peft's set_peft_model_state_dict for sharded parameters: the checkpoint's whole tensors (keys without the
    adapter name, as peft writes them) are copied into this process's rows."""
    from peft import get_peft_model_state_dict

    names = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    saved = list(get_peft_model_state_dict(peft_model, state_dict=dict(names)))
    if len(saved) != len(names):  # peft renames each trainable tensor (drops the adapter name); nothing else
        raise ValueError(f"peft names {len(saved)} adapter tensors for {len(names)} trainable parameters")
    saved_key = dict(zip(saved, names))
    missing = sorted(set(saved_key) - set(weights))
    if missing:
        raise ValueError(f"the checkpoint's adapter lacks {len(missing)} tensors, e.g. {missing[0]}")
    with torch.no_grad():
        for key, name in saved_key.items():
            write_full(names[name], weights[key].to(names[name].device))


def count_shard_units(model: torch.nn.Module) -> int:
    """How many modules FSDP2 gathers as one unit (0: not sharded)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return 0
    return sum(isinstance(m, FSDPModule) for m in model.modules())
