"""A study's shared `train` block, checked against TrainConfig's schema when the study loads.

The block holds TrainConfig's sections for every arm at once, so two of its parts are wider than one run's:
`method` may hold the settings of several methods (each arm takes its own, `registry.settings_for`), and
`optimizer.grit` holds the GRIT settings that only the arms with `optimizer: grit` take. What is set per arm
(the method and optimizer names) or per run (run_dir, seed, ...) is an error here, not silently replaced.

The study keeps the block as written (a sparse dict): arm overrides and calibration apply dotted keys to it, and
run fingerprints hash what the arms resolve to. `SharedTrain` is its typed view.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError

from ..config import DataSection, LoraSection, ModelSection, OptimizerSection, ScheduleSection, TrainSection
from ..losses import registry
from ..strict import Strict

PER_RUN = ("run_dir", "seed", "tensorboard_dir", "run_name")
PER_ARM = {"method": "arms[].method", "optimizer": "arms[].optimizer"}  # section -> where its `name` is set


class SharedTrain(Strict):
    model: ModelSection = Field(default_factory=ModelSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection = Field(default_factory=DataSection)
    method: dict[str, Any] = {}  # settings of any method (checked per method by `check_train_block`)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)  # `grit`: for the GRIT arms
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    train: TrainSection = Field(default_factory=TrainSection)


def check_train_block(block: dict[str, Any]) -> SharedTrain:
    """The typed view of a study's `train` block; a ValueError naming each offending key (`train.<key>`)."""
    for key in PER_RUN:
        if key in block:
            raise ValueError(f"train.{key} is set per run by the study; remove it")
    for section, where in PER_ARM.items():
        if isinstance(block.get(section), dict) and "name" in block[section]:
            raise ValueError(f"train.{section}.name is set per arm ({where}); remove it from the shared block")
    try:
        shared = SharedTrain.model_validate(block)
    except ValidationError as e:
        raise ValueError(_named(e, "train")) from None
    _check_method_settings(shared.method)
    return shared


def _check_method_settings(settings: dict[str, Any]) -> None:
    """Every key belongs to some method, and each method's part is valid for that method."""
    known = {k for cls in registry.METHODS.values() for k in cls.config.model_fields} - {"name"}
    unknown = sorted(set(settings) - known)
    if unknown:
        keys = ", ".join(f"train.method.{k}" for k in unknown)
        raise ValueError(f"{keys}: no method has this setting (methods: {', '.join(registry.METHODS)})")
    for name, cls in registry.METHODS.items():
        try:
            cls.config.model_validate({**registry.settings_for(name, settings), "name": name})
        except ValidationError as e:
            raise ValueError(f"{_named(e, 'train.method')} (as a {name} setting)") from None


def _named(e: ValidationError, prefix: str) -> str:
    return "; ".join(
        f"{'.'.join([prefix, *(str(p) for p in err['loc'])])}: {err['msg']} (got {_short(err['input'])})"
        for err in e.errors()
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
