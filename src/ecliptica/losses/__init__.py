"""Alignment methods, one module each (its config model and its loss); `registry` lists them.

See `registry` for the API that the config, the CLI, the study and the report read the methods from.
"""
from . import registry
from .base import AlignmentLoss, MethodSettings, ReferenceSettings, SequenceStats
from .cita import CITAConfig, CITALoss
from .dpo import DPOConfig, DPOLoss
from .registry import METHODS, MethodConfig, build_loss, get_method, method_names
from .sft import SFTConfig, SFTLoss

__all__ = ["AlignmentLoss", "CITAConfig", "CITALoss", "DPOConfig", "DPOLoss", "METHODS", "MethodConfig",
           "MethodSettings", "ReferenceSettings", "SFTConfig", "SFTLoss", "SequenceStats", "build_loss",
           "get_method", "method_names", "registry"]
