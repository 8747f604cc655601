"""Regional torch.compile: every decoder layer compiled, one graph shared by all of them.

An 8B LoRA step launches thousands of small kernels (RMSNorm, RoPE, SwiGLU, and each LoRA projection's cast,
down/up matmuls, scale and add); on a fast card the host cannot issue them as fast as the GPU runs them, and
autograd keeps a copy of the same input for every LoRA projection that reads it. Compiling the layer fuses
the pointwise work and lets the partitioner save each activation once. Compiling per layer rather than the
whole model keeps the compile to one layer's graph (reused by all layers, since the layers differ only in
their weights) and leaves the embedding, the mask building and the chunked LM head as they are.

Shapes are dynamic (packed rows change length every micro-batch), so one compile serves the run; the
adapter-disabled reference pass and the first layer (whose input needs no gradient) get a graph each.
"""

from __future__ import annotations

import torch

# Share of a compiled layer's activations the partitioner may save for the backward; it recomputes the rest
# from what it keeps, choosing the cheapest (pointwise results such as SwiGLU's product, casts and norms). At the
# Llama-3-8B shape without checkpointing, 0.8 cut the DPO step's peak from 35.2 to 27.6 GiB at the same tok/s
# (docs/archive/benchmarks_history.md, "less memory and fewer host waits"); with checkpointing the layer is
# recomputed anyway and the peak does not move.
# Recomputing an op repeats the same arithmetic, so what is computed does not change.
ACTIVATION_MEMORY_BUDGET = 0.8

# Inductor keeps a fused kernel's bf16 intermediates in fp32 where eager rounds each op's result to bf16, and it
# fuses the adapter-disabled reference pass (no backward) differently from the policy pass (which must save
# some of them). Without the emulation the two passes round differently: on the GPU a zero adapter gives a DPO
# loss of 0.6910, not log 2, and the compiled path's gradients 1.16x the eager bf16 path's distance from fp32
# (1B shape; docs/archive/benchmarks_history.md, "compiled = eager rounding"). Emulating eager's casts makes both
# passes round as eager does.
EMULATE_PRECISION_CASTS = True


def resolve_compile(setting: str, device: torch.device) -> bool:
    """`train.compile_layers`: auto = on CUDA only (on CPU, compiling costs more than a short run saves)."""
    if setting == "auto":
        return device.type == "cuda"
    return setting == "on"


def compile_decoder_layers(peft_model) -> int:
    """Compile each decoder layer of a peft-wrapped transformers model in place; returns how many."""
    layers = peft_model.get_base_model().get_decoder().layers
    # Past the recompile limit dynamo silently runs the layer eagerly. One run needs about three graphs, but a
    # process that trains several models (a benchmark, a notebook) adds graphs for each new shape or precision.
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 1024)
    # GRIT's factor taps are forward hooks on the LoRA modules (grit/factors.py). By default Dynamo does not guard
    # on module hooks, so a layer graph compiled for an earlier model in the process (an AdamW run before a GRIT run
    # in a study worker or a benchmark) would be reused without the taps, and GRIT would train with no factors. With
    # hook guards, a model whose LoRA modules carry taps gets its own graph (tests/train/test_compile.py).
    dynamo.skip_nnmodule_hook_guards = False
    # process-wide, read whenever a graph with a backward is compiled; a value the user set is kept
    functorch = torch._functorch.config
    if functorch.activation_memory_budget == 1.0:
        functorch.activation_memory_budget = ACTIVATION_MEMORY_BUDGET
    import torch._inductor.config as inductor

    inductor.emulate_precision_casts = EMULATE_PRECISION_CASTS  # process-wide, read when a graph compiles
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
