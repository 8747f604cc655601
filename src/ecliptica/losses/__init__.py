"""Alignment methods, one module each (its config model and its loss, with its `layout`); `registry` lists them.

See `registry` for the API that the config, the CLI, the study and the report read the methods from.
"""

from . import registry
from .base import AlignmentLoss, MethodSettings, Ratio, ReferenceSettings, SequenceStats
from .cita import CITAConfig, CITALoss
from .dpo import DPOConfig, DPOLoss
from .layout import CHOSEN_ONLY, PAIRED, UNPAIRED, Layout
from .registry import METHODS, MethodConfig, build_loss, get_method, method_names
from .sft import SFTConfig, SFTLoss

__all__ = [
    "AlignmentLoss",
    "CHOSEN_ONLY",
    "CITAConfig",
    "CITALoss",
    "DPOConfig",
    "DPOLoss",
    "Layout",
    "METHODS",
    "MethodConfig",
    "MethodSettings",
    "PAIRED",
    "Ratio",
    "ReferenceSettings",
    "SFTConfig",
    "SFTLoss",
    "SequenceStats",
    "UNPAIRED",
    "build_loss",
    "get_method",
    "method_names",
    "registry",
]
