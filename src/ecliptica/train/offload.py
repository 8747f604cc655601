"""Activation offloading: with gradient checkpointing, keep each decoder layer's saved input in host memory.

With checkpointing, the forward keeps only what the checkpointed layers were called with (one [tokens, hidden]
tensor per layer) and recomputes the rest in the backward. For Llama-3-8B and a ~3,000-token step that is
32 x 24 MB, the largest thing left between the forward and the backward; kept on the card, it puts the
checkpointed step's peak above TRL's (docs/archive/benchmarks_history.md, "less memory and fewer host
waits"). Unsloth's checkpointing offloads the same tensors.

The hooks see only what autograd saves outside the checkpointed regions (inside, checkpointing's own hooks come
first and save nothing), so they move exactly those inputs. Copies are asynchronous on the current stream: the
device-to-host copy is ordered before any later kernel that reuses the freed device memory, and the pinned host
buffer is kept by the caching host allocator until its copy has run. Nothing waits for the card, so a
host-bound step stays as fast; the copy's bytes are the same, so what is computed does not change.
"""

from __future__ import annotations

import torch

# Smaller saved tensors stay where they are: the copy's fixed cost would outweigh the memory it frees.
MIN_OFFLOAD_BYTES = 1 << 20


def resolve_offload(setting: str, device: torch.device, gradient_checkpointing: bool) -> bool:
    """`train.offload_activations`: auto = on with CUDA and gradient checkpointing."""
    if setting == "on" and not gradient_checkpointing:
        raise ValueError(
            "train.offload_activations=on needs model.gradient_checkpointing: true (without "
            "checkpointing every activation would cross to the host and back)"
        )
    if setting == "on" and device.type == "cpu":  # asked for explicitly, and it cannot take effect
        raise ValueError(
            "train.offload_activations=on: the model is on the CPU already, so nothing can be "
            "offloaded; set it to auto or off"
        )
    if setting == "auto":
        return gradient_checkpointing and device.type == "cuda"
    return setting == "on"


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved activations (dense, floating point, needing a gradient, at least `min_bytes`) on `source` devices go to
    pinned host memory at the forward and come back at the backward. Parameters and inputs that need no
    gradient (token ids, the frozen reference's states) stay. `source="cpu"` exercises the path without a GPU.
    `offloaded` counts the tensors sent, `offloaded_bytes` their size (for tests and the log)."""

    def __init__(self, source: str = "cuda", min_bytes: int = MIN_OFFLOAD_BYTES):
        self.source, self.min_bytes = source, min_bytes
        self.offloaded = self.offloaded_bytes = 0
        super().__init__(self._pack, self._unpack)

    def _wanted(self, t: torch.Tensor) -> bool:
        return (
            t.device.type == self.source
            and t.layout == torch.strided
            and t.is_floating_point()
            and t.requires_grad
            and not isinstance(t, torch.nn.Parameter)
            and t.numel() * t.element_size() >= self.min_bytes
        )

    def _pack(self, t: torch.Tensor):
        if not self._wanted(t):
            return t
        host = torch.empty_like(t, device="cpu", pin_memory=torch.cuda.is_available())
        host.copy_(t, non_blocking=True)
        self.offloaded += 1
        self.offloaded_bytes += host.numel() * host.element_size()
        return t.device, host

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=True)
