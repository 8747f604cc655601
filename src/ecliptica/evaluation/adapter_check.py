"""Checks on a LoRA adapter before evaluation works with it, so a bad adapter is one error naming its file and
the field or tensor, not a traceback from safetensors, hundreds of PEFT size-mismatch lines, scikit-learn's
"Input X contains NaN" after the embeddings were computed, or, for an adapter of another base model, no
error at all.

`check_adapter_files` needs no model (readable files, finite tensors, the recorded base model);
`check_adapter_fits` compares the tensors with the loaded base's layers. docs/reliability.md states the rules.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from ecliptica.models import model_identity
from ecliptica.train.safety import nonfinite_names

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# PEFT's saved keys: base_model.model.<module path>.<lora tensor>.weight (the adapter's name left out)
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|"
    r"lora_embedding_B)(?:\.weight)?$"
)


class AdapterError(ValueError):
    """An adapter that cannot be evaluated as configured; the message names the file and the field or tensor."""


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, the weights) of the adapter directory `path`, both readable and the weights finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config_path, weights_path = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    for f in (config_path, weights_path):
        if not f.is_file():
            raise AdapterError(f"{path}: no {f.name} (is this a saved LoRA adapter directory?)")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, OSError) as e:
        raise AdapterError(f"{config_path}: cannot be read ({e}); the file is truncated or corrupt") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: must hold a JSON object (PEFT's adapter settings)")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise AdapterError(
            f"{weights_path}: cannot read the adapter weights ({e}); the file is truncated or "
            f"corrupt: copy it again, or evaluate another checkpoint"
        ) from None
    if not tensors:
        raise AdapterError(f"{weights_path}: holds no tensors")
    bad = nonfinite_names(tensors)
    if bad:
        raise AdapterError(
            f"{weights_path}: {len(bad)} of {len(tensors)} tensors are not finite (NaN or inf), "
            f"e.g. {bad[0]}; the adapter is unusable: evaluate an earlier checkpoint or train it again"
        )
    return config, tensors


def check_base_model(path: str | Path, config: dict, model_name: str) -> None:
    """The adapter's recorded `base_model_name_or_path` must name the configured base model (models.model_identity:
    the embedded model under any of its names, a hub cache snapshot as its hub id, a local directory by its
    resolved path, anything else as written)."""
    recorded = config.get("base_model_name_or_path")
    config_path = Path(path) / ADAPTER_CONFIG
    if not recorded:
        warnings.warn(
            f"{config_path}: no base_model_name_or_path, so whether the adapter was trained on "
            f"{model_name} cannot be checked",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    if model_identity(recorded) != model_identity(model_name):
        raise AdapterError(
            f"{config_path}: base_model_name_or_path is {recorded!r}, but the configured base model "
            f"(model.name) is {model_name!r}; evaluate the adapter on the base it was trained on, or, "
            f"if both name the same model, write the configured name into base_model_name_or_path"
        )


def check_adapter_files(path: str | Path, model_name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Every check that needs no model: readable, finite, trained on `model_name`."""
    config, tensors = read_adapter(path)
    check_base_model(path, config, model_name)
    return config, tensors


def check_adapter_fits(path: str | Path, config: dict, tensors: dict[str, torch.Tensor], base) -> None:
    """Each LoRA tensor's shape must fit the base model's layer it adapts (lora_A: rank x inputs, lora_B:
    outputs x rank) and the rank `r` the adapter's config gives."""
    modules = dict(base.named_modules())
    rank = config.get("r") if not config.get("rank_pattern") else None
    problems = []
    for key, t in sorted(tensors.items()):  # the first problem named is the same on every run
        m = _LORA_KEY.match(key)
        if m is None or t.ndim != 2:
            continue
        module = modules.get(m["module"])
        if module is None:
            problems.append(f"tensor {key} adapts {m['module']}, which the base model does not have")
            continue
        layer = getattr(module, "base_layer", module)  # a layer PEFT already wraps (an earlier adapter)
        expected = _expected_shape(layer, m["part"], rank if rank is not None else _rank(m["part"], t))
        if expected is not None and tuple(t.shape) != expected:
            problems.append(
                f"tensor {key} has shape {tuple(t.shape)}, but {m['module']} of the base model needs {expected}"
            )
    if problems:
        more = f" ({len(problems)} of {len(tensors)} tensors do not fit)" if len(problems) > 1 else ""
        raise AdapterError(
            f"{Path(path) / ADAPTER_WEIGHTS}: {problems[0]}{more}; the adapter was trained on "
            f"another base model (or with another r than its {ADAPTER_CONFIG} says)"
        )


def _rank(part: str, t: torch.Tensor) -> int:
    return t.shape[0] if part.endswith("A") else t.shape[1]


def _expected_shape(layer, part: str, r: int) -> tuple[int, int] | None:
    """The shape PEFT gives `part` for `layer` (None for a layer kind not checked here)."""
    if isinstance(layer, torch.nn.Embedding):
        return {"lora_embedding_A": (r, layer.num_embeddings), "lora_embedding_B": (layer.embedding_dim, r)}.get(part)
    n_in, n_out = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
    if n_in is None or n_out is None:
        return None
    return {"lora_A": (r, n_in), "lora_B": (n_out, r)}.get(part)
