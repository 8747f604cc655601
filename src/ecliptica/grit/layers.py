"""Discovery of peft LoRA layers and LoRA parameter accounting."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class LoraLayerRef:
    name: str  # short module name, used in metric keys
    module: nn.Module  # the peft LoraLayer
    lora_A: nn.Linear  # weight r x in
    lora_B: nn.Linear  # weight out x r

    @property
    def rank(self) -> int:
        return self.lora_A.weight.shape[0]

    @property
    def width(self) -> int:
        """in + out: parameters per unit of rank."""
        return self.lora_A.weight.shape[1] + self.lora_B.weight.shape[0]


def _short_name(name: str) -> str:
    for prefix in ("module.", "base_model.model.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def find_lora_layers(
    model: nn.Module, adapter_name: str = "default", trainable_only: bool = True
) -> list[LoraLayerRef]:
    """Linear LoRA layers (peft ``LoraLayer``s) of ``adapter_name`` with trainable A and B.

    Duck-typed on ``lora_A``/``lora_B`` ModuleDicts so it works across peft versions.
    Embedding (ParameterDict) and conv LoRA layers are skipped: their rank axis is not last.
    """
    layers = []
    for name, module in model.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict):
            continue
        if adapter_name not in lora_a or adapter_name not in lora_b:
            continue
        a, b = lora_a[adapter_name], lora_b[adapter_name]
        if not (isinstance(a, nn.Linear) and isinstance(b, nn.Linear)):
            continue
        if trainable_only and not (a.weight.requires_grad and b.weight.requires_grad):
            continue
        layers.append(LoraLayerRef(_short_name(name), module, a, b))
    return layers


def parameter_counts(
    model: nn.Module,
    effective_ranks: dict[str, int] | None = None,
    adapter_name: str = "default",
) -> dict[str, float]:
    """Physical LoRA parameters vs effective ones (k * (in + out) with k the effective rank).

    ``effective_ranks`` maps layer name -> k (e.g. ``GritOptimizer.effective_ranks()``);
    layers missing from it count at their full rank.
    """
    effective_ranks = effective_ranks or {}
    physical = effective = 0
    for layer in find_lora_layers(model, adapter_name, trainable_only=False):
        physical += layer.rank * layer.width
        effective += min(effective_ranks.get(layer.name, layer.rank), layer.rank) * layer.width
    ratio = effective / physical if physical else 1.0
    return {"physical": physical, "effective": effective, "effective_ratio": ratio}
